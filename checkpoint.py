"""Checkpoints: plain tensors and primitives only, written atomically, read strictly; and
the metrics log (MetricsLog), the other file a training run writes.

A checkpoint is {"format", "model": fp32 state dict, "config": ModelConfig as a dict,
"tokenizer": its identity, "train_state" when resuming}; read with
torch.load(weights_only=True), its config checked before any tensor is allocated.
Resuming: load_resume, restore_training_state and train_state; the batch order needs
nothing saved beyond the step (data.BatchOrder: for the same data and flags, step k's
batch is a function of k), under any launcher.
Not run directly; the training scripts, sample.py and evaluate.py use it.
"""

import contextlib
import dataclasses
import hashlib
import io
import json
import os
import pickle
import random
import re
import tempfile
import zipfile
from dataclasses import asdict, fields

import torch

from errors import UserError
from model import ModelConfig, Transformer

CHECKPOINT_FORMAT = 1  # raise when the layout changes; newer files are refused with a reason


def atomic_write(path, payload):
    """Write bytes to path so that a crash or power loss leaves either the old file or the
    new one, never a part: a new temporary file in the same folder (mkstemp: created, never
    followed through a planted link), flushed and fsync'ed, then os.replace, then an fsync
    of the folder so the rename itself is on disk."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(payload)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a stop signal can land just after the rename: tmp is gone then
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_tensors(obj, path):
    """torch.save, atomically (see atomic_write)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write(path, buffer.getvalue())


def save_checkpoint(path, model, tokenizer, train_state=None):
    """Write {"model": fp32 state dict, "config": dict, "tokenizer": identity, ...} to path
    atomically: a crash never leaves a half-written file."""
    ckpt = {"format": CHECKPOINT_FORMAT,
            "model": {k: v.detach().float().cpu() for k, v in model.state_dict().items()},
            "config": asdict(model.config), "tokenizer": dict(tokenizer)}
    if train_state is not None:
        ckpt["train_state"] = train_state
    save_tensors(ckpt, path)


SAFE_TORCH = (2, 6)  # torch.load(weights_only=True) can be escaped to run code before 2.6


def check_zip_entries(path):
    """torch.save writes its zip entries stored, not compressed: refuse compressed ones,
    which could inflate a small file into gigabytes before any other check."""
    try:
        with zipfile.ZipFile(path) as z:
            entries = z.infolist()
    except zipfile.BadZipFile as e:
        raise UserError(f"{path}: the checkpoint is corrupt or cut short (a partial copy or "
                        f"download?): {e}") from None
    packed = [e.filename for e in entries if e.compress_type != zipfile.ZIP_STORED]
    if packed:
        raise UserError(f"{path}: not written by torch.save (compressed entries, e.g. "
                        f"{packed[0]}); refusing to inflate it")


def load_checkpoint(path):
    """Read a checkpoint with torch.load(weights_only=True). Anything else is a UserError
    that names the file and says what is wrong: empty, not a checkpoint, corrupt or cut
    short, holding pickled objects (refused: loading them could run code), or written by
    a newer minidpo."""
    if tuple(int(x) for x in torch.__version__.split(".")[:2]) < SAFE_TORCH:
        raise UserError(f"torch {torch.__version__} cannot load checkpoints safely "
                        "(weights_only can be escaped before 2.6): pip install 'torch>=2.6'")
    if not os.path.exists(path):
        raise UserError(f"no checkpoint at {path}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if not magic:
        raise UserError(f"{path}: the file is empty (0 bytes), not a checkpoint")
    is_zip = magic == b"PK\x03\x04"  # what torch.save writes
    is_pickle = len(magic) > 1 and magic[0] == 0x80 and 2 <= magic[1] <= 5  # may hold objects
    if not (is_zip or is_pickle):
        raise UserError(f"{path}: not a minidpo checkpoint (not a file written by torch.save)")
    if is_zip:
        check_zip_entries(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UserError(f"{path}: refusing to load a checkpoint that holds pickled objects "
                         f"other than tensors and plain values ({str(e).splitlines()[0]})"
                         ) from None
    except (RuntimeError, EOFError, OSError, KeyError, ValueError) as e:
        raise UserError(f"{path}: the checkpoint is corrupt or cut short (a partial copy or "
                         f"download?): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise UserError(f"{path}: not a minidpo checkpoint (no 'model' entry)")
    if ckpt.get("format", 1) > CHECKPOINT_FORMAT:
        raise UserError(f"{path}: written by a newer minidpo (checkpoint format "
                         f"{ckpt['format']}; this version reads up to {CHECKPOINT_FORMAT})")
    for key in ("config", "tokenizer"):
        if key not in ckpt:
            raise UserError(f"{path}: not a minidpo checkpoint (no '{key}')")
    return ckpt


def check_tokenizer(ckpt, tokenizer, path=""):
    """Refuse a checkpoint trained with another tokenizer than the data's."""
    if ckpt["tokenizer"] != dict(tokenizer):
        raise UserError(f"{path}: checkpoint was trained with a different tokenizer "
                         f"(checkpoint: {ckpt['tokenizer']}, data: {dict(tokenizer)})")


def config_from_checkpoint(ckpt, path=""):
    """The ModelConfig a checkpoint describes, checked before anything is allocated: only
    ModelConfig's fields, each of its type, and the shape's own rules."""
    config, known = ckpt["config"], {f.name: f for f in fields(ModelConfig)}
    if not isinstance(config, dict):
        raise UserError(f"{path}: not a minidpo checkpoint ('config' is not a dict)")
    unknown = sorted(set(config) - set(known))
    if unknown:
        raise UserError(f"{path}: unknown config keys {unknown} (not a minidpo checkpoint, or "
                        "from another version)")
    for name, value in config.items():
        kind = type(known[name].default)
        if not (isinstance(value, kind) or (kind is float and isinstance(value, int))) or (
                kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: config {name} must be {kind.__name__}, got {value!r}")
    try:
        return ModelConfig(**config)
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def model_from_checkpoint(ckpt, path=""):
    """Build the Transformer a checkpoint describes and load its weights strictly. Keys
    and shapes are compared on the meta device first (no memory), so a checkpoint whose
    config asks for a huge model but holds small tensors is refused before allocating."""
    config = config_from_checkpoint(ckpt, path)
    weights = ckpt["model"]
    if not isinstance(weights, dict) or not all(torch.is_tensor(v) for v in weights.values()):
        raise UserError(f"{path}: not a minidpo checkpoint ('model' is not a dict of tensors)")
    # Layers and experts are Python objects even on the meta device: count them first
    for name, pattern in (("n_layers", r"layers\.(\d+)\."), ("n_experts", r"\.experts\.(\d+)\.")):
        found = {int(m.group(1)) for k in weights if (m := re.search(pattern, k))}
        if getattr(config, name) != len(found):
            raise UserError(f"{path}: config {name} is {getattr(config, name)}, the weights "
                            f"have {len(found)}")
    with torch.device("meta"):
        expected = {k: v.shape for k, v in Transformer(config).state_dict().items()}
    if set(expected) != set(weights):
        raise UserError(f"{path}: checkpoint does not match the model: missing keys "
                        f"{sorted(set(expected) - set(weights))}, unexpected keys "
                        f"{sorted(set(weights) - set(expected))}")
    wrong = [f"{k} {tuple(weights[k].shape)} (expected {tuple(shape)})"
             for k, shape in expected.items() if weights[k].shape != shape]
    if wrong:
        raise UserError(f"{path}: checkpoint does not match its config: {', '.join(wrong[:3])}")
    model = Transformer(config)
    model.load_state_dict(weights, strict=True)
    return model


# Resuming: the training state a checkpoint keeps, and the run it belongs to


def load_resume(ckpt_path, enabled, model, tokenizer_id, run, log=print):
    """With --resume: the checkpoint at ckpt_path (there must be one), checked to be the
    same run (see run_identity), its weights loaded into model (restore_training_state
    takes the rest later), said in one line; without --resume, None."""
    if not enabled:
        return None
    if not os.path.exists(ckpt_path):  # never start over silently (and lose the metrics)
        raise UserError(f"--resume: no checkpoint at {ckpt_path} to continue from; run "
                        "without --resume to start a new run")
    resume = load_checkpoint(ckpt_path)
    check_tokenizer(resume, tokenizer_id, ckpt_path)
    saved = resume.get("train_state", {}).get("run")
    if saved is None:
        raise UserError(f"{ckpt_path}: has no training state to resume from")
    differences = [f"{k}: {saved.get(k)!r} in the checkpoint, {run.get(k)!r} now"
                   for k in sorted(set(saved) | set(run)) if saved.get(k) != run.get(k)]
    if differences:
        raise UserError(f"{ckpt_path}: --resume would continue another run; it differs in "
                        + "; ".join(differences) + ". Resume with the same settings, or "
                        "start a new run in another --out-dir.")
    model.load_state_dict(resume["model"], strict=True)
    log(f"resumed from {ckpt_path} at step {resume['train_state']['step']}")
    return resume


def restore_training_state(resume, optimizer, scaler, device):
    """Load optimizer, scaler and RNG states saved by train_state(); return the step to
    continue from (0 when not resuming)."""
    if resume is None:
        return 0
    state = resume["train_state"]
    optimizer.load_state_dict(state["optimizer"])
    scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], device)
    return state["step"]


def train_state(optimizer, scaler, step, args, run, device, world_size=1):
    """What --resume needs besides the weights. The data position is the step itself: for
    the same data and flags, step k's global batch is a function of k (data.BatchOrder).
    world_size is kept for the record only: a run resumed under another launcher is the
    same run and continues it."""
    return {"optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(), "step": step,
            "rng": rng_state(device), "args": vars(args), "run": run,
            "world_size": world_size}


def run_identity(args, keys, config):
    """What defines a run, so that --resume refuses to continue a different one (other
    data, batch, schedule or loss would silently remap steps): the values of the flags in
    `keys`, the model shape and the SHA-256 of each input file. Flags that do not change
    the numbers (--eval-every, --quiet, ...) are left out, and so is the launcher: the
    global batch, the steps and the data order are the same under any world size."""
    run = {k: getattr(args, k) for k in keys}
    run.update(model=asdict(config))
    for k in ("data", "sft_ckpt", "ref_ckpt", "tokenizer"):
        path = getattr(args, k, None)
        if path:
            run[f"{k}_sha256"] = file_digest(path)
    return run


def file_digest(path):
    """SHA-256 of a file's bytes, as hex."""
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def rng_state(device):
    """The random states, as tensors and plain values (checkpoint-safe): Python's, the
    CPU's and, on a GPU, that of this process's GPU only (not every visible one: another
    machine may have fewer). Every rank seeds alike and draws alike, so rank 0's state,
    which the checkpoint keeps, is every rank's."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and torch.is_tensor(state.get("cuda")):  # on this rank's GPU
        torch.cuda.set_rng_state(state["cuda"], device)


# DPO's models at step 0 (train_dpo.py makes the policy and its reference from them)


def dpo_model(path, tokenizer_id, config, check_shape=False):
    """A model for DPO, dropout off (in policy and reference alike): the checkpoint at path,
    its tokenizer checked; path '' gives a fresh model of shape config (for timing runs).
    check_shape refuses a checkpoint of another shape than config (--ref-ckpt against the
    policy)."""
    if not path:
        return Transformer(dataclasses.replace(config, dropout=0.0))
    ckpt = load_checkpoint(path)
    check_tokenizer(ckpt, tokenizer_id, path)
    ckpt["config"]["dropout"] = 0.0
    model = model_from_checkpoint(ckpt, path)
    if check_shape and model.config != config:
        raise UserError(f"--ref-ckpt {path}: its model shape differs from the policy's "
                        f"({model.config} vs {config})")
    return model


# What a run writes besides checkpoints: its metrics


class MetricsLog:
    """Appends one JSON object per logged step to metrics.jsonl (rank 0 only); with
    --wandb PROJECT the same records also go to Weights & Biases."""

    def __init__(self, path, enabled, resume, args=None):
        self.path, self.enabled, self.wandb_run = path, enabled, None
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
            if not resume and os.path.exists(path):
                os.remove(path)
        if enabled and args is not None and args.wandb:  # extras/wandb_log.py
            from extras.wandb_log import start_run
            self.wandb_run = start_run(args, path)

    def write(self, record):
        if self.enabled:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
            if self.wandb_run is not None:
                self.wandb_run.log(record, step=record["step"])

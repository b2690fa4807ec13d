"""The offline bundle for a GPU machine without network: the wheels it lacks, PTB, and the one command to run there.

    bash benchmarks/gpu_bundle.sh [DIR]                     # build (needs PyPI); DIR defaults to gpu-bundle/ here
    python benchmarks/gpu_bundle.py build DIR --find-links WHEELS   # build from wheels already on disk, offline
    python benchmarks/gpu_bundle.py check DIR               # the requirement closure and the size, again
    python benchmarks/gpu_bundle.py verify DIR --site SITE  # on the GPU machine (run.sh does it): real versions

The machine it is for (benchmarks/gpu_checks.py's acceptance run): CPython 3.12 on x86-64 Linux with torch and
triton, numpy, pandas, pyarrow, matplotlib, sacrebleu, sentencepiece, tqdm, psutil, pytest and pytest-timeout
(`MACHINE_HAS`, with what those need to be installed at all), and no Ray, Optuna or MLflow. It gets the
checkout and this folder, at most 64 MiB in all; the build refuses a folder that, with the checkout's tracked
files, is over 60 MiB. What goes in, and why it fits:
- `ray[tune]==2.60.0`, repacked: the 79 MB wheel without `ray/jars/ray_dist.jar` (32 MB, the Java workers; the
  study starts Python workers only), its other members unchanged but LZMA-compressed (zip's own method 14, which
  pip's zipfile reads), its RECORD rewritten to match, a `G2_BUNDLE` note in its dist-info. BUNDLE.json says so.
- `optuna`, `mlflow-skinny==3.17.2` (the tracking client the study uses, without the full mlflow's server and
  UI), and every dependency of the three that the machine lacks; plus `cryptography`, which mlflow-skinny does
  not declare but its SQLite tracking store imports (`mlflow.store.model_registry.dbmodels` needs Fernet).
- PTB as `data/ptb.tar.xz`: the only corpus the checks read (`ptb-medium`; `study` uses the toy corpus).
The wheels are installed with `--no-deps` (pip's --target ignores what the machine has), so the build checks the
closure itself: every Requires-Dist of every wheel, with the requested extras and markers evaluated for the
machine, is met by a bundled wheel or by a `MACHINE_HAS` distribution; `verify` re-checks the latter's versions there.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from email.parser import Parser
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# cryptography: imported by mlflow's SQLite store (the study's default tracking URI), undeclared by mlflow-skinny
REQUIREMENTS = ("ray[tune]==2.60.0", "optuna>=5,<6", "mlflow-skinny==3.17.2", "cryptography")
PYTHON, ABI = "3.12", "cp312"
# torch's own wheels need glibc 2.28, so a machine running torch takes manylinux_2_28 wheels too
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_28_x86_64")
MARKERS = {"python_version": PYTHON, "python_full_version": f"{PYTHON}.0", "implementation_name": "cpython",
           "implementation_version": f"{PYTHON}.0", "platform_python_implementation": "CPython", "os_name": "posix",
           "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
           "platform_release": "", "platform_version": ""}
# What the machine has: the packages listed for it, and what each of those needs to be installed at all.
MACHINE_HAS = frozenset({
    "torch", "triton", "filelock", "typing-extensions", "sympy", "mpmath", "networkx", "jinja2", "markupsafe",
    "fsspec", "setuptools",                                                                    # torch (3.12)
    "numpy", "pandas", "python-dateutil", "six", "tzdata", "pytz", "pyarrow",                 # pandas 2 and 3
    "matplotlib", "contourpy", "cycler", "fonttools", "kiwisolver", "packaging", "pillow", "pyparsing",
    "sacrebleu", "portalocker", "regex", "tabulate", "colorama", "lxml", "sentencepiece",
    "tqdm", "psutil", "pytest", "pytest-timeout", "iniconfig", "pluggy", "pygments", "pip",
})
RAY_DROPPED = ("ray/jars/",)
LIMIT_MIB = 60
CORPORA = ("ptb",)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def wheel_name(path: Path) -> tuple[str, str]:
    """(canonical project name, version) from a wheel's file name."""
    name, version = path.name.split("-")[:2]
    return canonical(name), version


def wheel_metadata(path: Path):
    """The wheel's METADATA as an email message (Requires-Dist, Name, Version)."""
    with zipfile.ZipFile(path) as whl:
        member = next(n for n in whl.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
        return Parser().parsestr(whl.read(member).decode())


def record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def repack(source: Path, dest: Path, drop: tuple[str, ...], note: str) -> list[dict]:
    """`source` without the members under the `drop` prefixes, LZMA-compressed, with a rewritten RECORD and a
    `G2_BUNDLE` note in its dist-info; returns what was dropped (name, bytes)."""
    dropped = []
    with zipfile.ZipFile(source) as src, zipfile.ZipFile(dest, "w") as out:
        record = next(n for n in src.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        rows = []
        for info in src.infolist():
            if info.filename.startswith(drop):
                dropped.append({"member": info.filename, "bytes": info.file_size, "in_wheel": info.compress_size})
                continue
            if info.filename == record or info.is_dir():
                continue
            data = src.read(info)
            copy = zipfile.ZipInfo(info.filename, info.date_time)
            copy.external_attr, copy.create_system = info.external_attr, info.create_system   # keeps +x on raylet
            out.writestr(copy, data, compress_type=zipfile.ZIP_LZMA)
            rows.append((info.filename, record_hash(data), str(len(data))))
        note_name = record.rsplit("/", 1)[0] + "/G2_BUNDLE"
        out.writestr(note_name, note.encode(), compress_type=zipfile.ZIP_DEFLATED)
        rows.append((note_name, record_hash(note.encode()), str(len(note.encode()))))
        text = io.StringIO()
        csv.writer(text, lineterminator="\n").writerows([*rows, (record, "", "")])
        out.writestr(record, text.getvalue(), compress_type=zipfile.ZIP_DEFLATED)
    return dropped


def record_problems(path: Path) -> list[str]:
    """Where a wheel's RECORD and its members disagree (hash, size, a member missing or unlisted)."""
    with zipfile.ZipFile(path) as whl:
        record = next(n for n in whl.namelist() if re.fullmatch(r"[^/]+\.dist-info/RECORD", n))
        listed = {row[0]: row[1:] for row in csv.reader(io.StringIO(whl.read(record).decode())) if row}
        members = {i.filename for i in whl.infolist() if not i.is_dir()}
        problems = [f"{name}: listed, not in the wheel" for name in sorted(set(listed) - members)]
        problems += [f"{name}: in the wheel, not listed" for name in sorted(members - set(listed))]
        for name in sorted(members & set(listed) - {record}):
            data = whl.read(name)
            if listed[name] != [record_hash(data), str(len(data))]:
                problems.append(f"{name}: hash or size differs from RECORD")
    return problems


def closure_problems(wheels: list[Path], roots=REQUIREMENTS, machine=MACHINE_HAS) -> list[str]:
    """What the wheel set leaves unmet for `roots` on the machine, and the wheels nothing requires."""
    from packaging.requirements import Requirement

    found = {wheel_name(w)[0]: (wheel_name(w)[1], wheel_metadata(w)) for w in wheels}
    problems, reached, expanded = [], set(), set()
    todo = [(Requirement(r), "requested") for r in roots]
    while todo:
        req, by = todo.pop()
        name = canonical(req.name)
        if name in machine:
            continue   # its version is checked on the machine (`verify`)
        if name not in found:
            problems.append(f"{req} (for {by}) is neither in the bundle nor on the machine")
            continue
        version, meta = found[name]
        if not req.specifier.contains(version, prereleases=True):
            problems.append(f"{req} (for {by}): the bundle has {name} {version}")
        reached.add(name)
        if (name, frozenset(req.extras)) in expanded:
            continue
        expanded.add((name, frozenset(req.extras)))
        for line in meta.get_all("Requires-Dist") or []:
            dep = Requirement(line)
            if dep.marker is None or any(dep.marker.evaluate({**MARKERS, "extra": e}) for e in ("", *req.extras)):
                todo.append((dep, f"{name} {version}"))
    problems += [f"{name}: bundled but nothing requires it" for name in sorted(set(found) - reached)]
    problems += [f"{name}: bundled but the machine has it" for name in sorted(set(found) & machine)]
    return problems


def tree_bytes(repo: Path = REPO) -> int:
    """The checkout as it is copied: its tracked files (git ls-files)."""
    names = subprocess.run(["git", "ls-files", "-z"], cwd=repo, capture_output=True, check=True).stdout.split(b"\0")
    return sum((repo / n.decode()).stat().st_size for n in names if n and (repo / n.decode()).is_file())


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def find_corpus_dir(name: str) -> Path:
    for root in (os.environ.get("G2_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "data"):
        if root and (Path(root) / name).is_dir():
            return Path(root) / name
    raise SystemExit(f"gpu_bundle: no {name}/ under $G2_DATA_DIR, ../shared/data or data/: set G2_DATA_DIR")


def download(dest: Path, find_links: Path | None) -> None:
    """The cp312 manylinux wheels of REQUIREMENTS and all their dependencies, into `dest`."""
    where = ["--no-index", "--find-links", str(find_links)] if find_links else []
    platforms = [arg for p in PLATFORMS for arg in ("--platform", p)]
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--only-binary=:all:", *platforms,
                    "--python-version", PYTHON, "--implementation", "cp", "--abi", ABI,
                    "-d", str(dest), *where, *REQUIREMENTS], check=True, env={**os.environ, "PIP_CONSTRAINT": ""})


def build(dest: Path, find_links: Path | None) -> int:
    if dest.exists() and any(dest.iterdir()):
        raise SystemExit(f"gpu_bundle: {dest} exists and is not empty; remove it or name another folder")
    with tempfile.TemporaryDirectory(prefix="g2-wheels-") as tmp:
        download(Path(tmp), find_links)
        (dest / "wheels").mkdir(parents=True)
        wheels, repacked = [], {}
        for whl in sorted(Path(tmp).glob("*.whl")):
            name, version = wheel_name(whl)
            if name in MACHINE_HAS:
                continue
            target = dest / "wheels" / whl.name
            if name == "ray":
                note = (f"Repacked by g2-study benchmarks/gpu_bundle.py: without {', '.join(RAY_DROPPED)} (Java "
                        f"workers), members LZMA-compressed, RECORD rewritten. Not the upstream wheel.\n")
                dropped = repack(whl, target, RAY_DROPPED, note)
                repacked[whl.name] = {"from_bytes": whl.stat().st_size, "dropped": dropped,
                                      "why": "Java workers; g2-study runs Python workers only",
                                      "compression": "LZMA (zip method 14) instead of deflate"}
            else:
                shutil.copy2(whl, target)
            wheels.append(target)
    data = dest / "data"
    data.mkdir()
    for corpus in CORPORA:
        with tarfile.open(data / f"{corpus}.tar.xz", "w:xz", preset=9) as tar:
            tar.add(find_corpus_dir(corpus), arcname=corpus)
    run_sh = dest / "run.sh"
    shutil.copy2(REPO / "benchmarks" / "gpu_bundle_run.sh", run_sh)
    manifest = {"for": {"python": PYTHON, "abi": ABI, "platforms": PLATFORMS, "machine_has": sorted(MACHINE_HAS)},
                "requirements": REQUIREMENTS, "repacked": repacked,
                "wheels": [{"file": w.name, "bytes": w.stat().st_size,
                            "sha256": hashlib.sha256(w.read_bytes()).hexdigest()} for w in wheels],
                "data": sorted(p.name for p in data.iterdir()), "run": "bash run.sh (from the checkout)"}
    (dest / "BUNDLE.json").write_text(json.dumps(manifest, indent=2) + "\n")
    code = check(dest)
    if code:
        shutil.rmtree(dest)
        print(f"gpu_bundle: removed {dest}: not fit to copy", file=sys.stderr)
    return code


def check(dest: Path) -> int:
    """The closure, the RECORDs of repacked wheels, and the size with the checkout; 0 when all hold."""
    manifest = json.loads((dest / "BUNDLE.json").read_text())
    wheels = [dest / "wheels" / w["file"] for w in manifest["wheels"]]
    problems = closure_problems(wheels, manifest["requirements"], frozenset(manifest["for"]["machine_has"]))
    problems += [f"{name}: {p}" for name in manifest["repacked"] for p in record_problems(dest / "wheels" / name)]
    bundle, tree = folder_bytes(dest), tree_bytes()
    total = (bundle + tree) / 2**20
    print(f"bundle {dest}: {len(wheels)} wheels, {bundle / 2**20:.1f} MiB; with the checkout's tracked files "
          f"({tree / 2**20:.1f} MiB): {total:.1f} MiB of {LIMIT_MIB} MiB")
    if total > LIMIT_MIB:
        problems.append(f"{total:.1f} MiB with the checkout is over {LIMIT_MIB} MiB")
    for p in problems:
        print(f"  {p}", file=sys.stderr)
    return 1 if problems else 0


def verify(dest: Path, site: Path) -> int:
    """On the machine: every requirement of every installed bundle distribution, met by the versions there."""
    try:
        from packaging.requirements import Requirement
    except ImportError:   # pip vendors it
        from pip._vendor.packaging.requirements import Requirement
    from importlib import metadata

    manifest = json.loads((dest / "BUNDLE.json").read_text())
    extras = {canonical(Requirement(r).name): Requirement(r).extras for r in manifest["requirements"]}
    problems = []
    for dist in metadata.distributions(path=[str(site)]):
        name = canonical(dist.metadata["Name"])
        for line in dist.requires or []:
            dep = Requirement(line)
            if dep.marker and not any(dep.marker.evaluate({"extra": e}) for e in ("", *extras.get(name, ()))):
                continue
            try:
                have = metadata.version(dep.name)
            except metadata.PackageNotFoundError:
                problems.append(f"{name} needs {dep}: not installed")
                continue
            if not dep.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {dep}: this machine has {have}")
    print(f"verify: {len(problems)} unmet requirement(s)" + "".join(f"\n  {p}" for p in problems))
    return 1 if problems else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="download, repack, check; refuses over the size limit")
    b.add_argument("dest", type=Path)
    b.add_argument("--find-links", type=Path, help="take the wheels from this folder, offline (pip --no-index)")
    c = sub.add_parser("check", help="the closure, the repacked RECORDs and the size of a built bundle")
    c.add_argument("dest", type=Path)
    v = sub.add_parser("verify", help="on the GPU machine: requirements against the installed versions")
    v.add_argument("dest", type=Path)
    v.add_argument("--site", type=Path, required=True)
    args = parser.parse_args(argv)
    if args.command == "build":
        return build(args.dest.resolve(), args.find_links)
    if args.command == "check":
        return check(args.dest.resolve())
    return verify(args.dest.resolve(), args.site.resolve())


if __name__ == "__main__":
    raise SystemExit(main())

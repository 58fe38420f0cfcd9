"""The whole GPU check in one command: does the paper's pipeline run on CUDA, how fast is each
stage, and what does each fast-path switch buy (issue 24, item 7).

In order of value, each step with a share of the time budget (default 8 minutes), a progress line
when it starts and ends, and the results written after every step (a run cut off keeps what it
measured):

1. requirements: the packages this project imports, and the fix when one is missing;
2. models: the real-architecture random-weight pipeline folders (SD 2.1, its v-prediction twin as
   D_phi's base, the SDXL refiner; ``bench/arch.py``), built where absent;
3. generate-paper: ``dreamflow generate --preset paper`` from those folders, a few iterations per
   stage (nvdiffrast and tinycudann where they import, their pure-PyTorch twins otherwise);
4. timing: one stage at a time, ``bench/iteration.py``'s run of the pipeline's own stage at the
   paper's settings: ms per iteration, peak memory, the diffusion model's floor and the ratio, the
   projected stage time (paper iterations x ms/it), and ``bench/memory_budget.py``'s counted peak;
5. switches: the same with one fast-path switch off at a time (bf16, SDPA, channels-last);
6. toy-job: the toy preset's whole job; 7. toy-train: a short toy-world training, timed;
8. compile (``--compile``, last): the same iterations with the UNet compiled.

    python3 bench/gpu_check.py --out $OUT --compile        # on a CUDA machine (bench/gpu_check_device.sh)
    python3 bench/gpu_check.py --dry-run --out /tmp/gc     # every step on the CPU at tiny sizes
    python3 bench/gpu_check.py --wheels .whl               # the wheels a CUDA machine without them lacks

The output folder gets three files: ``gpu_check.json`` (every figure), ``gpu_check.md`` (tables
for the README) and ``gpu_check.log`` (the progress lines). Model folders and job outputs go to
``--work`` (gigabytes; reused by a second run).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

ROOT = Path(__file__).resolve().parents[1]
# The repository's packages, whether or not it is installed (the GPU machine runs a plain copy).
SOURCE_PATHS = [str(ROOT), str(ROOT / "backend"), str(ROOT / "shared")]
for _path in reversed(SOURCE_PATHS):
    if _path not in sys.path:
        sys.path.insert(0, _path)

OUTPUT_FILES = ("gpu_check.json", "gpu_check.md", "gpu_check.log")
STAGES = ("1", "2a", "2b", "3")
PROMPT = "a DSLR photo of a delicious hamburger"
TOY_PROMPT = "a red cube"

#: Seconds each step may take at most of the default budget (scaled with --budget; unused time
#: passes to the later steps).
DEFAULT_BUDGET_S = 480.0
STEP_CAPS = {"models": 90.0, "generate-paper": 120.0, "timing": 150.0, "switches": 90.0, "toy-job": 60.0,
             "toy-train": 40.0, "compile": 240.0}
STEP_ORDER = ("requirements", "models", "generate-paper", "timing", "switches", "toy-job", "toy-train", "compile")

#: One switch of the fast path off at a time (FastPath fields, and the weights' dtype).
VARIANTS: dict[str, dict[str, Any]] = {
    "fast path": {},
    "float32 (no bf16)": {"dtype": "float32"},
    "unfused attention (no SDPA)": {"switches": {"sdpa": False}},
    "no channels-last": {"switches": {"channels_last": False}},
}
COMPILE_VARIANT = "+ torch.compile (UNet)"

#: Iterations per stage of the paper-preset job, and the timed iterations of each bench run.
GENERATE_STEPS = 3
TIMING = {"iters": 5, "warmup": 2}
SWITCH_TIMING = {"iters": 3, "warmup": 1}

#: A dry run's sizes: the paper (and toy) preset shrunk to the smoke preset's scale (every path, tiny shapes).
DRY_RUN_SIZES: dict[str, Any] = {
    "prior.encode_size": 64,
    "stage1.resolution": 32, "stage1.samples_per_ray": 16, "stage1.grid.levels": 4, "stage1.grid.log2_table_size": 12,
    "stage1.mesh_resolution": 32, "stage1.occupancy_resolution": 16,
    "geometry.resolution": 32, "geometry.tet_resolution": 16,
    "texture.resolution": 32, "texture.grid.levels": 4, "texture.grid.log2_table_size": 12,
    "refine.resolution": 64, "refine.grid.levels": 4, "refine.grid.log2_table_size": 12,
    "export.texture_size": 64, "export.face_budget": 2000, "export.view_resolution": 32,
}
DRY_RUN_STEPS = 2
#: A dry run times the switches on this stage only: they act through the same code in every stage.
DRY_RUN_SWITCH_STAGES = ("2b",)
#: The short toy training: TrainConfig fields (`dreamflow toyworld train`'s settings), 16 of its 256
#: views per object of the 36, a few of the oriented objects and normal maps, and a few steps of each model.
TOY_TRAIN = {"steps": 40, "vae_steps": 20, "views_per_object": 16, "oriented_views": 6, "normal_views": 2}
DRY_RUN_TOY_TRAIN = {"steps": 1, "vae_steps": 1, "views_per_object": 1, "oriented_views": 1, "normal_views": 1, "batch": 4,
                     "vae_batch": 4}
#: Lines of the children's output not worth a progress line (nor a place in the record's tail).
NOISE = re.compile(r"^\s*$|Loading weights|Writing model shards|requires torchvision|should be kept in float32")

# -- what the GPU machine has ------------------------------------------------------------------------------------

#: Import name of each distribution this project depends on, where it differs from the name.
IMPORT_NAMES = {"pyzmq": "zmq", "pymcubes": "mcubes", "pillow": "PIL", "fast-simplification": "fast_simplification"}
#: The device machine's image ("cuda"), as /work/.library/device/KINDS.md lists it (read on a
#: machine running it on 2026-11-17), and the versions a session saw there (2026-11).
DEVICE_IMAGE_PACKAGES = frozenset("""
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy peft
pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six sortedcontainers
statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm
tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope
triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl
zipp""".split())
DEVICE_IMAGE_VERSIONS = {"accelerate": "1.15.0", "huggingface-hub": "1.33.0", "numpy": "2.5.2", "safetensors": "0.8.0",
                         "tokenizers": "0.23.2", "transformers": "5.17.0"}
WHEEL_PYTHON = "3.12"
#: manylinux tags a CPython 3.12 x86-64 machine with glibc up to 2.39 takes (pip matches each exactly).
WHEEL_PLATFORMS = ("manylinux1_x86_64", "manylinux2010_x86_64", "manylinux2014_x86_64",
                   *(f"manylinux_2_{n}_x86_64" for n in range(5, 40)))
#: What travels to the device machine at most (its working-tree limit is 64 MiB, the code included).
WHEELS_LIMIT_BYTES = 48 * 2 ** 20


def normalise(name: str) -> str:
    """A distribution name in its canonical form (PEP 503: lower case, runs of -_. as one -)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements() -> list[str]:
    """The project's run-time requirements (pyproject.toml's dependencies), torch left out."""
    import tomllib

    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [d for d in deps if normalise(_requirement_name(d)) != "torch"]


def requirements_to_resolve(requirements: Iterable[str], present: Iterable[str] = DEVICE_IMAGE_PACKAGES) -> list[str]:
    """The requirements the GPU machine's image does not meet by name: only their dependencies are
    resolved, so that what the image has (torch above all, which peft pulls in) is never fetched."""
    have = {normalise(p) for p in present}
    return [r for r in requirements if normalise(_requirement_name(r)) not in have]


def _requirement_name(requirement: str) -> str:
    return re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", requirement.strip()).group(0)


def missing_packages(requirements: Iterable[str]) -> list[str]:
    """The distributions among ``requirements`` whose module this Python cannot import."""
    missing = []
    for requirement in requirements:
        name = _requirement_name(requirement)
        if importlib.util.find_spec(IMPORT_NAMES.get(normalise(name), name.replace("-", "_"))) is None:
            missing.append(name)
    return missing


def is_torch_family(name: str) -> bool:
    """torch and what its wheel brings (CUDA libraries, Triton): the GPU machine's own, never carried."""
    n = normalise(name)
    return n in ("torch", "triton") or n.startswith(("nvidia-", "cuda-"))


def plan_wheels(report: dict[str, Any], present: Iterable[str] = DEVICE_IMAGE_PACKAGES) -> list[dict[str, str]]:
    """From pip's resolution report (``pip install --dry-run --report``): the wheels to carry, i.e.
    every resolved distribution the GPU machine lacks, torch's family left out; sorted by name."""
    have = {normalise(p) for p in present}
    wanted = {}
    for item in report.get("install", []):
        meta = item["metadata"]
        name = normalise(meta["name"])
        if name in have or is_torch_family(name):
            continue
        url = item.get("download_info", {}).get("url", "")
        if not url.endswith(".whl"):
            raise RuntimeError(f"{meta['name']} {meta['version']} resolved to a source archive ({url}); the GPU "
                               f"machine cannot build it. To fix: pin a version that has a cp312 manylinux wheel.")
        wanted[name] = {"name": meta["name"], "version": meta["version"], "file": url.rsplit("/", 1)[-1]}
    return [wanted[k] for k in sorted(wanted)]


def pip_target_args() -> list[str]:
    """pip's options that pick wheels for the GPU machine's Python (CPython 3.12, manylinux x86-64)."""
    args = ["--only-binary=:all:", "--python-version", WHEEL_PYTHON, "--implementation", "cp"]
    for platform in WHEEL_PLATFORMS:
        args += ["--platform", platform]
    return args


def resolve_command(requirements: list[str], report: Path, constraints: Path, scratch: Path) -> list[str]:
    """The pip command that resolves ``requirements`` for the GPU machine without installing anything."""
    return [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet", "--report",
            str(report), "--target", str(scratch), "-c", str(constraints), *pip_target_args(), *requirements]


def download_command(wheels: list[dict[str, str]], folder: Path) -> list[str]:
    """The pip command that downloads exactly ``wheels`` (pinned, no dependencies) into ``folder``."""
    return [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(folder), *pip_target_args(),
            *(f"{w['name']}=={w['version']}" for w in wheels)]


def gather_wheels(folder: Path, log: Callable[[str], None] = print) -> list[dict[str, str]]:
    """Resolve the project's requirements that the GPU machine lacks (its own packages pinned to
    the versions seen there), and download the wheels it lacks into ``folder``; what was gathered."""
    import tempfile

    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="gpu-check-wheels-") as tmp:
        tmp_path = Path(tmp)
        constraints = tmp_path / "constraints.txt"
        # At most the image's versions (not exactly them: the index may not hold the image's build).
        constraints.write_text("".join(f"{k}<={v}\n" for k, v in DEVICE_IMAGE_VERSIONS.items()))
        report = tmp_path / "report.json"
        wanted = requirements_to_resolve(project_requirements())
        log(f"resolving {', '.join(wanted)} for CPython {WHEEL_PYTHON} manylinux x86-64, with at most the GPU "
            f"image's {', '.join(f'{k} {v}' for k, v in DEVICE_IMAGE_VERSIONS.items())}")
        subprocess.run(resolve_command(wanted, report, constraints, tmp_path / "target"), check=True)
        wheels = plan_wheels(json.loads(report.read_text()))
    log(f"downloading {len(wheels)} wheels: " + ", ".join(f"{w['name']} {w['version']}" for w in wheels))
    subprocess.run(download_command(wheels, folder), check=True)
    size = sum(p.stat().st_size for p in folder.glob("*.whl"))
    log(f"{len(list(folder.glob('*.whl')))} wheels, {size / 2 ** 20:.1f} MiB in {folder}")
    if size > WHEELS_LIMIT_BYTES:
        log(f"warning: {size / 2 ** 20:.1f} MiB is more than {WHEELS_LIMIT_BYTES / 2 ** 20:.0f} MiB: with the "
            f"code it may not fit the device machine's 64 MiB working-tree limit")
    return wheels


# -- the run's record ---------------------------------------------------------------------------------------------

class Interrupted(Exception):
    """The check was told to stop (SIGTERM from `timeout`, or Ctrl-C)."""


@dataclass
class Check:
    """One run: its settings, the figures so far, and where they are written after every change."""

    out: Path
    work: Path
    dry_run: bool
    budget_s: float
    compile: bool
    started: float = field(default_factory=time.monotonic)
    data: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.work.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "gpu_check.log", "w", buffering=1)
        self.data.update(steps={name: {"status": "pending"} for name in STEP_ORDER}, timings=[])

    @property
    def device(self) -> str:
        """The device the jobs and benches run on."""
        return "cpu" if self.dry_run else "cuda"

    def elapsed(self) -> float:
        """Seconds since the check started."""
        return time.monotonic() - self.started

    def remaining(self) -> float:
        """Seconds of the budget left."""
        return self.budget_s - self.elapsed()

    def say(self, message: str) -> None:
        """A progress line, on stderr and in the log file."""
        line = f"[gpu-check {self.elapsed():6.1f}s] {message}"
        print(line, file=sys.stderr, flush=True)
        self._log.write(line + "\n")

    def save(self) -> None:
        """Write the JSON and the markdown as they stand (atomically: a reader never sees half a file)."""
        self.data["elapsed_s"] = round(self.elapsed(), 1)
        for name, text in (("gpu_check.json", json.dumps(self.data, indent=2, default=str)),
                           ("gpu_check.md", format_markdown(self.data))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text)
            tmp.replace(self.out / name)

    def child_env(self) -> dict[str, str]:
        """The environment of the processes the check starts: the repository importable, no hub."""
        env = dict(os.environ, PYTHONUNBUFFERED="1", HF_HUB_OFFLINE="1")
        if self.dry_run:  # tiny shapes gain nothing from threads, and on a shared CPU they spin against each other
            env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        env["PYTHONPATH"] = os.pathsep.join(SOURCE_PATHS + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        return env


def run_process(check: Check, command: list[str], deadline: float, label: str,
                on_poll: Callable[[], None] | None = None) -> dict[str, Any]:
    """Run ``command`` until it ends or ``deadline`` (monotonic seconds) passes, echoing its output
    as progress lines; its exit code, wall seconds, whether it was stopped, and its last lines."""
    start = time.monotonic()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
                            env=check.child_env(), cwd=str(ROOT))
    tail: deque[str] = deque(maxlen=60)

    def pump() -> None:
        for line in proc.stdout:
            line = line.rstrip()
            if not NOISE.search(line):
                tail.append(line)
                check.say(f"  {label} | {line}")

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        while proc.poll() is None:
            if time.monotonic() > deadline:
                timed_out = True
                break
            time.sleep(0.5)
            if on_poll is not None:
                on_poll()
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
        if on_poll is not None:
            on_poll()
    return {"returncode": proc.returncode, "seconds": round(time.monotonic() - start, 2), "timed_out": timed_out,
            "tail": list(tail)}


def process_status(run: dict[str, Any]) -> str:
    """ok, timeout or failed, from :func:`run_process`'s record."""
    return "timeout" if run["timed_out"] else "ok" if run["returncode"] == 0 else "failed"


# -- the steps ----------------------------------------------------------------------------------------------------

def step_requirements(check: Check, deadline: float) -> dict[str, Any]:
    """What this machine has: Python, torch and its device, the accelerators, missing packages."""
    import platform

    import torch

    from dreamflow import accel

    missing = missing_packages(project_requirements())
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
                           "cpus": os.cpu_count(), "missing": missing, "dry_run": check.dry_run}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2 ** 30, 1), multiprocessors=props.multi_processor_count)
    else:
        env["device_name"] = "cpu"
    env["accelerators"] = accel.report()
    check.data["environment"] = env
    if missing:
        raise StepFailed(f"missing packages: {', '.join(missing)}. To fix: on a machine with pip run "
                         f"`python3 bench/gpu_check.py --wheels .whl`, carry .whl and install it first: "
                         f"`python3 -m pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and "
                         f"`export PYTHONPATH=/tmp/site` (bench/gpu_check_device.sh does both)")
    if not check.dry_run and not torch.cuda.is_available():
        raise StepFailed("CUDA is not available on this machine; to check every step on a CPU at tiny sizes, "
                         "add --dry-run")
    used = {k: v for k, v in env["accelerators"].items() if k != "cuda"}
    return {"note": ", ".join(f"{k} {'yes' if v else 'no (pure-PyTorch twin)'}" for k, v in used.items())}


class StepFailed(Exception):
    """A step that ran and did not do its job; the message says what, and the fix where there is one."""


def step_models(check: Check, deadline: float) -> dict[str, Any]:
    """Build the pipeline folders (real architectures, random weights; tiny ones in a dry run)."""
    from bench.arch import build_model_folders

    folders = build_model_folders(check.work / "models", tiny=check.dry_run, log=check.say)
    check.data["models"] = {role: str(path) for role, path in folders.items()}
    return {"folders": check.data["models"]}


def paper_job_overrides(check: Check) -> dict[str, Any]:
    """``--set`` values of the paper-preset job: the built model folders, a few steps per stage."""
    models = check.data["models"]
    steps = DRY_RUN_STEPS if check.dry_run else GENERATE_STEPS
    overrides: dict[str, Any] = {"prior.model": models["prior"], "prior.phi_model": models["phi"],
                                 "prior.refiner_model": models["refiner"], "prior.local_files_only": "true"}
    overrides.update({f"{name}.steps": steps for name in ("stage1", "geometry", "texture", "refine")})
    if check.dry_run:
        overrides.update(DRY_RUN_SIZES)
    return overrides


def generate_command(check: Check, preset: str, prompt: str, out: Path, overrides: dict[str, Any]) -> list[str]:
    """``dreamflow generate`` as a user types it, on the check's device."""
    command = [sys.executable, "-m", "dreamflow", "generate", prompt, "--preset", preset, "--out", str(out),
               "--device", check.device]
    for key, value in overrides.items():
        command += ["--set", f"{key}={value}"]
    return command


def fresh_folder(folder: Path) -> Path:
    """``folder``, emptied: a figure read from it afterwards is this run's, never an earlier one's."""
    shutil.rmtree(folder, ignore_errors=True)
    return folder


_STAGE_DONE = re.compile(r"^\[(?P<stage>\w+)\] done in (?P<time>\S+)")


def job_record(run: dict[str, Any], out: Path) -> dict[str, Any]:
    """A job's figures: per-stage seconds from its report.json (or, cut off, from its progress lines)."""
    record = {k: run[k] for k in ("returncode", "seconds", "timed_out")}
    report = out / "report.json"
    if report.is_file():
        data = json.loads(report.read_text())
        record["stages"] = {name: round(s["seconds"], 2) for name, s in data["stages"].items()}
        record["job_seconds"] = round(data["seconds_total"], 2)
        record["mesh"] = data.get("mesh")
    else:
        record["stages"] = {m["stage"]: m["time"] for m in (_STAGE_DONE.match(line) for line in run["tail"]) if m}
    if run["returncode"] != 0:
        record["error_tail"] = run["tail"][-8:]
    return record


def step_generate_paper(check: Check, deadline: float) -> dict[str, Any]:
    """``dreamflow generate --preset paper`` from the built folders, a few iterations per stage."""
    out = fresh_folder(check.work / "generate-paper")
    run = run_process(check, generate_command(check, "paper", PROMPT, out, paper_job_overrides(check)), deadline,
                      "generate")
    return {"status": process_status(run), **job_record(run, out)}


def step_toy_job(check: Check, deadline: float) -> dict[str, Any]:
    """The toy preset's whole job (a dry run: two steps per stage)."""
    out = fresh_folder(check.work / "toy-job")
    overrides: dict[str, Any] = {}
    if check.dry_run:
        overrides.update({f"{n}.steps": DRY_RUN_STEPS for n in ("stage1", "geometry", "texture", "refine")}, **DRY_RUN_SIZES)
    run = run_process(check, generate_command(check, "toy", TOY_PROMPT, out, overrides), deadline, "toy job")
    return {"status": process_status(run), **job_record(run, out)}


def step_toy_train(check: Check, deadline: float) -> dict[str, Any]:
    """A short toy-world training in its own process (the toy world trains on the CPU)."""
    settings = {**TOY_TRAIN, **(DRY_RUN_TOY_TRAIN if check.dry_run else {})}
    spec = {"out": str(fresh_folder(check.work / "toy-train")), "settings": settings}
    run = run_process(check, [sys.executable, str(Path(__file__).resolve()), "--child", "toy-train",
                              "--spec", json.dumps(spec)], deadline, "toy train")
    record = {"status": process_status(run), **{k: run[k] for k in ("returncode", "seconds", "timed_out")},
              "settings": settings}
    result = Path(spec["out"]) / "gpu_check_train.json"
    if result.is_file():
        record.update(json.loads(result.read_text()))
    rendered = [m for m in map(_RENDERED.search, run["tail"]) if m]
    if rendered:  # also when cut off: the training's first phase, one line per part of the set
        record["render_seconds"] = sum(float(m.group(1)) for m in rendered)
    if run["returncode"] != 0:
        record["error_tail"] = run["tail"][-8:]
    return record


_RENDERED = re.compile(r"rendered \d+ images of .* in (\d+(?:\.\d+)?) s")


def timing_items(variants: Iterable[str], stages: Iterable[str] = STAGES) -> list[dict[str, Any]]:
    """The bench runs of one step: each variant in turn, on every stage of ``stages``."""
    return [{"stage": stage, "variant": variant} for variant in variants for stage in stages]


def _timing_step(check: Check, deadline: float, items: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    """Run bench items in a child process, merging each result into the record as it lands; a
    child that dies is restarted on the items after the one it died on."""
    todo = list(items)
    runs: list[dict[str, Any]] = []
    # One results file per child: a child that dies mid-write leaves a broken last line behind it.
    current = {"file": check.work / f"timings-{kind}-0.jsonl", "seen": 0}

    def merge() -> None:
        if not current["file"].is_file():
            return
        # Whole lines only: the last piece is empty, or a record the child is still writing.
        lines = current["file"].read_text().split("\n")[:-1]
        for line in lines[current["seen"]:]:
            record = json.loads(line)
            check.data["timings"].append(record)
            todo[:] = [i for i in todo if (i["stage"], i["variant"]) != (record["stage"], record["variant"])]
            check.save()
        current["seen"] = len(lines)

    while todo and time.monotonic() < deadline:
        current.update(file=check.work / f"timings-{kind}-{len(runs)}.jsonl", seen=0)
        current["file"].unlink(missing_ok=True)
        spec = {"items": todo, "results": str(current["file"]), "dry_run": check.dry_run, "work": str(check.work),
                "models": str(check.work / "models"), "deadline_in_s": deadline - time.monotonic()}
        run = run_process(check, [sys.executable, str(Path(__file__).resolve()), "--child", "timings",
                                  "--spec", json.dumps(spec)], deadline, kind, on_poll=merge)
        runs.append({k: run[k] for k in ("returncode", "seconds", "timed_out")})
        if todo and (run["returncode"] != 0 or run["timed_out"]):
            failed = dict(todo[0], status="timeout" if run["timed_out"] else "crashed", error_tail=run["tail"][-8:])
            check.data["timings"].append(failed)
            todo.pop(0)
            check.save()
        elif todo:
            break  # the child ended cleanly with items left: it judged the time too short
    mine = [r for r in check.data["timings"] if (r["stage"], r["variant"]) in {(i["stage"], i["variant"]) for i in items}]
    bad = [r for r in mine if r["status"] != "ok"]
    status = "ok" if len(mine) == len(items) and not bad else "partial" if any(r["status"] == "ok" for r in mine) else "failed"
    return {"status": status, "runs": runs, "items_done": sum(r["status"] == "ok" for r in mine), "items": len(items),
            "not_run": [f"{i['stage']}/{i['variant']}" for i in todo]}


def step_timing(check: Check, deadline: float) -> dict[str, Any]:
    """Each stage's iteration at the paper's settings with the fast path, and its counted memory."""
    return _timing_step(check, deadline, timing_items(["fast path"]), "timing")


def step_switches(check: Check, deadline: float) -> dict[str, Any]:
    """Each stage with one fast-path switch off at a time."""
    stages = DRY_RUN_SWITCH_STAGES if check.dry_run else STAGES
    return _timing_step(check, deadline, timing_items([v for v in VARIANTS if v != "fast path"], stages), "switches")


def step_compile(check: Check, deadline: float) -> dict[str, Any]:
    """Each stage with the UNet compiled (last: compiling takes minutes)."""
    if not check.compile:
        return {"status": "skipped", "note": "not asked for (--compile)"}
    stages = DRY_RUN_SWITCH_STAGES if check.dry_run else STAGES
    return _timing_step(check, deadline, timing_items([COMPILE_VARIANT], stages), "compile")


STEP_FUNCTIONS: dict[str, Callable[[Check, float], dict[str, Any]]] = {
    "requirements": step_requirements, "models": step_models, "generate-paper": step_generate_paper,
    "timing": step_timing, "switches": step_switches, "toy-job": step_toy_job, "toy-train": step_toy_train,
    "compile": step_compile,
}


def run_check(check: Check) -> int:
    """Every step in order, each within its share of the budget; 0 when every step that ran is ok."""
    check.data.update(command=" ".join([Path(sys.argv[0]).name] + sys.argv[1:]), budget_s=check.budget_s,
                      dry_run=check.dry_run, started=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
    check.save()
    for index, name in enumerate(STEP_ORDER, 1):
        record = check.data["steps"][name]
        remaining = check.remaining()
        if remaining <= 0:
            record.update(status="skipped", note="the time budget was spent")
            check.say(f"step {index}/{len(STEP_ORDER)} {name}: skipped (budget spent)")
            check.save()
            continue
        allowed = min(STEP_CAPS.get(name, remaining) * check.budget_s / DEFAULT_BUDGET_S, remaining)
        check.say(f"step {index}/{len(STEP_ORDER)} {name}: start ({allowed:.0f} s of {remaining:.0f} s left)")
        start = time.monotonic()
        try:
            result = STEP_FUNCTIONS[name](check, start + allowed)
            result.setdefault("status", "ok")
        except StepFailed as exc:
            result = {"status": "failed", "error": str(exc)}
        except Interrupted:
            record.update(status="interrupted", seconds=round(time.monotonic() - start, 2))
            check.say(f"step {index}/{len(STEP_ORDER)} {name}: interrupted")
            check.save()
            return 130
        except Exception as exc:  # one broken step must not hide the figures of the others
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        result["seconds"] = round(time.monotonic() - start, 2)
        record.clear()
        record.update(result)
        check.say(f"step {index}/{len(STEP_ORDER)} {name}: {record['status']} in {record['seconds']:.1f} s"
                  + (f" ({record['error']})" if "error" in record else ""))
        check.save()
        if name == "requirements" and record["status"] != "ok":
            check.say("stopping: the steps after this one need what it found missing")
            return 2
        if name == "models" and record["status"] != "ok":
            check.say("stopping: every later step reads the model folders")
            return 1
    statuses = [s["status"] for s in check.data["steps"].values()]
    check.say(f"done in {check.elapsed():.0f} s: {', '.join(f'{k} {v}' for k, v in zip(STEP_ORDER, statuses))}; "
              f"results in {check.out}")
    return 0 if all(s in ("ok", "skipped") for s in statuses) else 1


# -- the child processes ------------------------------------------------------------------------------------------

def _stage_overrides(stage: str, dry_run: bool) -> dict[str, Any] | None:
    """A dry run's stages use the smoke preset, whose D_phi is exact: ask for the paper's LoRA."""
    if not dry_run or stage == "2a":
        return None
    config = {"1": "stage1", "2b": "texture", "3": "refine"}[stage]
    return {f"{config}.method.score_model": "lora"}


def bench_settings(item: dict[str, Any], spec: dict[str, Any]):
    """The bench/iteration.py settings of one timing item (a stage under a variant)."""
    from bench.iteration import BenchSettings

    dry = spec["dry_run"]
    real_arch = {"1": "sd21", "2a": "sd21", "2b": "sd21", "3": "sdxl-refiner"}[item["stage"]]
    compiled = item["variant"] == COMPILE_VARIANT
    variant = {} if compiled else VARIANTS[item["variant"]]
    # A dry run takes the CUDA defaults (bf16 weights, channels-last) on the CPU, so that turning
    # each one off runs the same code paths as on the GPU.
    base_switches = {"channels_last": True} if dry else {}
    if compiled and dry:
        base_switches["compile_backend"] = "eager"  # dynamo's tracing only: inductor's codegen takes minutes on a CPU
    timing = TIMING if item["variant"] == "fast path" else SWITCH_TIMING
    return BenchSettings(
        stage=item["stage"], arch="tiny" if dry else real_arch, device="cpu" if dry else "cuda",
        iters=1 if dry else timing["iters"], warmup=0 if dry else timing["warmup"],
        preset="smoke" if dry else "paper", dtype=variant.get("dtype", "bfloat16" if dry else "auto"),
        compile=compiled, workdir=str(Path(spec["work"]) / "bench"), models=spec["models"],
        overrides=_stage_overrides(item["stage"], dry), switches={**base_switches, **variant.get("switches", {})})


def timing_record(item: dict[str, Any], r: dict[str, Any], seconds: float) -> dict[str, Any]:
    """The figures of one bench run the check keeps (the whole run_bench result is large)."""
    st = r["settings"]
    return {**item, "status": "ok", "seconds": round(seconds, 2), "arch": st["arch"], "dtype": st["dtype"],
            "resolution": st["resolution"], "fast_path": r["fast_path"], "memory_fallbacks": r["memory_fallbacks"],
            "numerics": r["numerics"], "iterations_timed": r["iterations_timed"], "ms_per_it": r["iteration_ms"],
            "breakdown_ms": r["breakdown_ms"], "floor_ms": r["floor_ms"], "unet_floor_ms": r["unet_floor_ms"],
            "ratio_to_floor": r["ratio_to_floor"], "ratio_to_floor_with_vae": r["ratio_to_floor_with_vae"],
            "peak_gpu_gb": r["peak_gpu_gb"], "counted_tflop": r["counted_tflop"],
            "paper_iterations": r["paper_iterations"], "projected_paper_s": r["projected_paper_s"],
            "build_seconds": round(r["build_seconds"], 2), "device_name": r["device_name"]}


def counted_peak_gib(stage: str) -> float:
    """bench/memory_budget.py's counted peak of the stage at the paper's settings, GiB (the
    diffusion terms on the meta device, the 3D terms from a CPU render at the paper's sizes)."""
    from bench.memory_budget import GIB, count

    return round(count(stage)["total_bytes"] / GIB, 2)


def child_timings(spec: dict[str, Any]) -> int:
    """Run timing items one after another, appending each record to the results file at once."""
    import torch

    from bench.iteration import run_bench

    deadline = time.monotonic() + spec["deadline_in_s"]
    for item in spec["items"]:
        if time.monotonic() >= deadline:
            return 0
        print(f"{item['variant']}, stage {item['stage']}", flush=True)
        start = time.monotonic()
        try:
            r = run_bench(bench_settings(item, spec), log=lambda m: print(m, flush=True))
            record = timing_record(item, r, time.monotonic() - start)
            # Not in a dry run: the count renders at the paper's sizes (tests/bench/test_memory_budget.py checks it).
            if item["variant"] == "fast path" and not spec["dry_run"]:
                record["counted_peak_gib"] = counted_peak_gib(item["stage"])
        except Exception as exc:  # the next item still runs; a CUDA error that poisons the process ends it
            record = {**item, "status": "failed", "seconds": round(time.monotonic() - start, 2),
                      "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(f"{item['variant']}, stage {item['stage']}: {record['status']}"
              + (f", {record['ms_per_it']['median']:.1f} ms/it" if record["status"] == "ok" else f" ({record['error']})"),
              flush=True)
        with open(spec["results"], "a") as f:
            f.write(json.dumps(record, default=str) + "\n")
        r = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return 0


def child_toy_train(spec: dict[str, Any]) -> int:
    """The toy world's training with the CLI's defaults and the check's few steps; timed."""
    from dataclasses import replace

    from dreamflow.toyworld.train import TrainConfig, train
    from dreamflow.toyworld.world import ALL_PROMPTS, ORIENTED_PROMPTS, PROMPTS

    cfg = replace(TrainConfig(), **spec["settings"])
    out = Path(spec["out"])
    start = time.monotonic()
    train(out, cfg, log=lambda line: print(line, flush=True))
    seconds = time.monotonic() - start
    record = {"train_seconds": round(seconds, 2), "images": len(PROMPTS) * cfg.views_per_object + len(ORIENTED_PROMPTS) * cfg.oriented_views
              + len(ALL_PROMPTS) * cfg.normal_views, "unet_steps": cfg.steps,
              "vae_steps": cfg.vae_steps, "batch": cfg.batch,
              "model_written": (out / "generator" / "model_index.json").is_file()}
    (out / "gpu_check_train.json").write_text(json.dumps(record))
    return 0


# -- the markdown -------------------------------------------------------------------------------------------------

def _fmt(value: Any, spec: str = ".1f", empty: str = "-") -> str:
    return empty if value is None else format(value, spec)


def _duration(seconds: float | None) -> str:
    from bench.iteration import _hms

    return "-" if seconds is None else _hms(seconds)


def projection(timings: list[dict[str, Any]]) -> dict[str, Any]:
    """The full pipeline at the paper's iteration counts from the fast path's ms/it: per stage and the sum."""
    fast = {r["stage"]: r for r in timings if r["variant"] == "fast path" and r["status"] == "ok"}
    stages = {s: fast[s]["projected_paper_s"] for s in STAGES if s in fast}
    return {"stages_s": stages, "total_s": sum(stages.values()) if len(stages) == len(STAGES) else None,
            "missing": [s for s in STAGES if s not in fast]}


def format_markdown(data: dict[str, Any]) -> str:
    """The check's figures as markdown tables, ready for the README."""
    env = data.get("environment", {})
    lines = [f"## GPU check: {env.get('device_name', '?')}" + (" (dry run: CPU, tiny shapes)" if data.get("dry_run") else ""),
             "",
             f"`{data.get('command', '')}`, started {data.get('started', '?')}, {data.get('elapsed_s', 0):.0f} s of a "
             f"{data.get('budget_s', 0):.0f} s budget; Python {env.get('python', '?')}, torch {env.get('torch', '?')}, "
             f"CUDA {env.get('cuda') or '-'}, {env.get('memory_gib', '-')} GiB, {env.get('cpus', '?')} CPUs; "
             f"accelerators: {data['steps'].get('requirements', {}).get('note', '?')}.",
             "", "| step | status | seconds | note |", "|---|---|---|---|"]
    for name in STEP_ORDER:
        s = data["steps"].get(name, {})
        note = s.get("error") or s.get("note") or ""
        if "items" in s:
            note = f"{s['items_done']}/{s['items']} runs" + (f"; not run: {', '.join(s['not_run'])}" if s["not_run"] else "")
        lines.append(f"| {name} | {s.get('status', '?')} | {_fmt(s.get('seconds'))} | {note.replace('|', '/')} |")
    lines += _job_table("The paper preset's job (`generate --preset paper`, "
                        f"{DRY_RUN_STEPS if data.get('dry_run') else GENERATE_STEPS} iterations per stage)",
                        data["steps"].get("generate-paper", {}))
    timings = data.get("timings", [])
    fast = [r for r in timings if r["variant"] == "fast path"]
    lines += ["", "### One iteration per stage at the paper's settings (fast path)", "",
              "| stage | arch, dtype | ms/it (median) | UNet floor ms | ratio | ratio with VAE | peak GiB | counted GiB "
              "| paper its | projected |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in fast:
        if r["status"] != "ok":
            lines.append(f"| {r['stage']} | - | {r['status']} | | | | | | | |")
            continue
        lines.append(f"| {r['stage']} | {r['arch']}, {r['dtype']} | {r['ms_per_it']['median']:.1f} | {r['unet_floor_ms']:.1f} "
                     f"| {r['ratio_to_floor']:.2f} | {r['ratio_to_floor_with_vae']:.2f} | {_fmt(r['peak_gpu_gb'], '.2f')} "
                     f"| {_fmt(r.get('counted_peak_gib'), '.2f')} | {r['paper_iterations']} | {_duration(r['projected_paper_s'])} |")
    proj = projection(timings)
    lines.append(f"| **full pipeline** | | | | | | | | | **{_duration(proj['total_s'])}** |")
    lines += ["", "### Fast-path switches: ms/it with one switch off (x: against the fast path; peak GPU memory)", ""]
    variants = list(VARIANTS) + [COMPILE_VARIANT]
    lines += ["| stage | " + " | ".join(variants) + " |", "|---" * (len(variants) + 1) + "|"]
    for stage in STAGES:
        by_variant = {r["variant"]: r for r in timings if r["stage"] == stage}
        base = by_variant.get("fast path")
        cells = []
        for v in variants:
            r = by_variant.get(v)
            if r is None:
                cells.append("-")
            elif r["status"] != "ok":
                cells.append(r["status"])
            else:
                ms = r["ms_per_it"]["median"]
                ratio = f" ({ms / base['ms_per_it']['median']:.2f}x)" if base and base["status"] == "ok" and v != "fast path" else ""
                peak = "" if r["peak_gpu_gb"] is None else f", {r['peak_gpu_gb']:.1f} GiB"
                cells.append(f"{ms:.1f}{ratio}{peak}")
        lines.append(f"| {stage} | " + " | ".join(cells) + " |")
    lines += _job_table("The toy preset's job (`generate --preset toy`)", data["steps"].get("toy-job", {}))
    train = data["steps"].get("toy-train", {})
    lines += ["", "### Toy-world training (`dreamflow toyworld train`, few steps)", "",
              "| images | rendered in s | VAE steps | UNet steps (batch) | whole training s | status |",
              "|---|---|---|---|---|---|",
              f"| {train.get('images', '-')} | {_fmt(train.get('render_seconds'))} | {train.get('vae_steps', '-')} "
              f"| {train.get('unet_steps', '-')} ({train.get('batch', '-')}) | {_fmt(train.get('train_seconds'))} "
              f"| {train.get('status', '?')} |"]
    return "\n".join(lines) + "\n"


def _job_table(title: str, job: dict[str, Any]) -> list[str]:
    lines = ["", f"### {title}", "", "| stage | seconds |", "|---|---|"]
    for stage, seconds in (job.get("stages") or {}).items():
        lines.append(f"| {stage} | {seconds if isinstance(seconds, str) else _fmt(seconds)} |")
    lines.append(f"| whole command ({job.get('status', 'not run')}) | {_fmt(job.get('seconds'))} |")
    return lines


# -- command line -------------------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    """Command line: the check, a child step (internal), or the wheels for a GPU machine."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="folder for gpu_check.json, gpu_check.md and gpu_check.log")
    p.add_argument("--work", default=None, help="folder for the model folders and job outputs "
                                                "(default /tmp/dreamflow-gpu-check, or OUT/../work in a dry run)")
    p.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S,
                   help=f"seconds for the whole check (default {DEFAULT_BUDGET_S:.0f}); each step's share scales with it")
    p.add_argument("--dry-run", action="store_true", help="every step on the CPU at tiny sizes (no GPU needed)")
    p.add_argument("--compile", action="store_true", help="last, if time is left: the stages with the UNet compiled")
    p.add_argument("--wheels", default=None, metavar="DIR",
                   help="download the wheels a CUDA machine with its own torch lacks into DIR, and stop")
    p.add_argument("--child", choices=("timings", "toy-train"), help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        spec = json.loads(a.spec)
        return child_timings(spec) if a.child == "timings" else child_toy_train(spec)
    if a.wheels:
        gather_wheels(Path(a.wheels))
        return 0
    if not a.out:
        p.error("--out is required (the folder for gpu_check.json, gpu_check.md and gpu_check.log)")
    if a.budget <= 0:
        p.error("--budget must be positive")
    out = Path(a.out)
    work = Path(a.work) if a.work else (out.parent / (out.name + "-work") if a.dry_run else Path("/tmp/dreamflow-gpu-check"))
    check = Check(out, work, a.dry_run, a.budget, a.compile)

    def stop(signum, frame):
        raise Interrupted()

    signal.signal(signal.SIGTERM, stop)
    try:
        return run_check(check)
    except (Interrupted, KeyboardInterrupt):
        check.say("interrupted: the results so far are written")
        check.save()
        return 130


if __name__ == "__main__":
    sys.exit(main())

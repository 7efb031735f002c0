"""Every command in README.md's ```bash blocks, run as a user types it.

The commands run in a subprocess, in a copy of the repository (its tracked and untracked files,
with the checkout's `.venv` and `data/` linked in, as a user's clone has them), with the default
MLflow store of that copy: no setting a user would not type. Only these are added:

- size overrides, so a 10-epoch run becomes a 30-step one (`debug=fast`, fewer trials), passed
  the way the README says to pass overrides (`ARGS="..."` for make targets);
- the paths a user fills in: `/data/...` become data sets made here in the documented layouts
  (a manifest, OpenSLR 54, parquet), run folders and run ids become those of runs made earlier
  in this module, `talk.flac call.wav` become audio files.

A command that needs what no test machine has (a GPU, the 2.3 GB w2v-bert-2.0 checkpoint, a
CUDA build of torch, a real cluster) runs with `plan=true` appended (every job's config composed
and checked, its data found, its GPU-hours printed, nothing started) or as make's dry run, and
says why. Every README command
must be listed in COMMANDS, and every entry of COMMANDS must be in the README: the two cannot
drift apart.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import time
import urllib.request
from pathlib import Path

import helpers
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import soundfile as sf
import soxr
from conftest import compose_cfg
from mlflow.tracking import MlflowClient

from asr.data import load_splits
from asr.paths import REPO_DIR

README = REPO_DIR / "README.md"
FAST = "debug=fast"
RUN_A = "outputs/2026-11-28/14-02-11"  # placeholders the README uses for run folders
RUN_B = "outputs/2026-11-28/15-30-00"
RUN_ID = "0a1b2c3d4e5f"

# README command → the test that runs it (or composes it, with the reason in the test)
COMMANDS = {
    "make train": "test_make_train",
    "make test": "test_make_test",
    "make sweep": "test_make_sweep",
    "make ui": "test_make_ui",
    ".venv/bin/python train.py trainer.epochs=3 trainer.lr=1e-3": "test_train_with_overrides",
    ".venv/bin/python train.py debug=fast": "test_train_debug_fast",
    ".venv/bin/python train.py --help": "test_train_help",
    'make setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"': (
        "test_make_setup_with_a_cuda_torch"
    ),
    ".venv/bin/python train.py dataset=manifest dataset.train=/data/ne/train.jsonl dataset.dev=/data/ne/dev.jsonl "
    "dataset.test=/data/ne/test.jsonl": "test_train_on_a_manifest",
    ".venv/bin/python train.py dataset=openslr54 dataset.root=/data/openslr54": "test_train_on_openslr54",
    ".venv/bin/python -m asr.audit dataset=openslr54 dataset.root=/data/openslr54": "test_audit_openslr54",
    ".venv/bin/python train.py dataset=hf_hub dataset.path=parquet dataset.splits.dev=null "
    "'dataset.data_files={train: /data/train.parquet, test: /data/test.parquet}'": "test_train_on_parquet",
    ".venv/bin/python train.py experiment=seed dataset=openslr54 dataset.root=/data/openslr54": "test_gpu_recipes_plan",
    ".venv/bin/python train.py model=w2v_bert_2 trainer=gpu_fast dataset=openslr54 "
    "dataset.root=/data/openslr54": "test_gpu_recipes_plan",
    ".venv/bin/python train.py -m trainer.epochs=8,20,40": "test_epoch_grid",
    ".venv/bin/python train.py -m trainer.epochs=8,20,40 trainer.lr_scheduler=wsd hydra/sweeper=branches": (
        "test_epoch_grid_sharing_a_trunk"
    ),
    "make compare": "test_make_compare",
    ".venv/bin/python sweep.py sweep=grid_epochs_lr sweep.workers=2": "test_grid_study_with_two_workers",
    ".venv/bin/python sweep.py sweep.report_only=true": "test_sweep_report_only",
    ".venv/bin/python train.py experiment=best_cpu_demo_synthetic_ne_tiny": "test_rerun_the_best_trial",
    ".venv/bin/python train.py -m hydra/sweeper=optuna 'trainer.lr=tag(log,interval(1e-4,3e-2))' trainer.epochs=2,4 "
    "hydra.sweeper.n_trials=12 hydra.sweeper.workers=2": "test_optuna_sweeper_door",
    ".venv/bin/python train.py -m hydra/launcher=slurm hydra.launcher.partition=gpu "
    "experiment=seed_8_20_40 dataset=openslr54 "
    "dataset.root=/shared/openslr54": "test_cluster_commands_plan",
    ".venv/bin/python sweep.py sweep=lr_epochs experiment=seed dataset=openslr54 dataset.root=/shared/openslr54 "
    "hydra/launcher=slurm hydra.launcher.partition=gpu sweep.workers=16 "
    "sweep.storage=postgresql+psycopg2://optuna:secret@db-host/optuna": "test_cluster_commands_plan",
    f".venv/bin/python -m asr.evaluate run_dir={RUN_A}": "test_evaluate_a_run_folder",
    f".venv/bin/python -m asr.evaluate mlflow_run={RUN_ID} split=dev": "test_evaluate_an_mlflow_run",
    f".venv/bin/python -m asr.evaluate model_dir={RUN_A}/model dataset=manifest dataset.train=/data/ne/train.jsonl "
    "dataset.test=/data/ne/test.jsonl": "test_evaluate_a_model_folder_on_a_manifest",
    f".venv/bin/python -m asr.evaluate 'compare=[{RUN_A},{RUN_B}]'": "test_compare_two_runs",
    f".venv/bin/python -m asr.transcribe {RUN_A}/model talk.flac call.wav": "test_transcribe_files",
    f".venv/bin/python -m asr.lm build run_dir={RUN_A}": "test_lm_build_tune_and_evaluate",
    f".venv/bin/python -m asr.lm tune run_dir={RUN_A}": "test_lm_build_tune_and_evaluate",
    f".venv/bin/python -m asr.evaluate run_dir={RUN_A} decoder=beam_lm": "test_lm_build_tune_and_evaluate",
    ".venv/bin/python train.py lm.after_training=true": "test_train_with_the_lm_after_training",
}


def readme_commands() -> list[str]:
    """Each command of the README's bash blocks: continuation lines joined, trailing comments dropped."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(encoding="utf-8"), flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


def test_every_readme_command_has_a_test_and_every_test_a_command():
    commands = readme_commands()
    untested = [c for c in commands if c not in COMMANDS]
    assert not untested, f"README commands with no test in tests/test_readme.py COMMANDS: {untested}"
    stale = [c for c in COMMANDS if c not in commands]
    assert not stale, f"COMMANDS entries no longer in README.md: {stale}"
    names = set(globals())
    assert all(test in names for test in COMMANDS.values())


# ---- the user's machine: a copy of the repository, their data ---------------------------------


class Checkout:
    """A copy of the repository in which commands run as a user runs them."""

    def __init__(self, root: Path, data: dict[str, str]) -> None:
        self.root = root
        self.substitutions = data  # README placeholder → real path
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
        self.env["PYTHONUNBUFFERED"] = "1"

    def run(
        self, command: str, *size: str, timeout: int = 600, check: bool = True, **placeholders: str
    ) -> subprocess.CompletedProcess:
        """The README command with its placeholders filled in and `size` overrides appended."""
        for placeholder, value in {**self.substitutions, **placeholders}.items():
            command = command.replace(placeholder, value)
        if size and command.startswith("make "):
            command += f" ARGS={shlex.quote(' '.join(size))}"
        elif size:
            command += " " + " ".join(shlex.quote(s) for s in size)
        result = subprocess.run(
            ["bash", "-c", command], cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout
        )
        if check:
            assert result.returncode == 0, f"{command}\n--- stderr ---\n{result.stderr[-5000:]}"
        return result

    def run_folders(self) -> set[Path]:
        return {p.parent for p in self.root.glob("outputs/*/*/metrics.json")}

    def new_run(self, command: str, *size: str, **placeholders: str) -> Path:
        """Run a training command and return its run folder (relative to the checkout)."""
        before = self.run_folders()
        self.run(command, *size, **placeholders)
        new = self.run_folders() - before
        assert len(new) == 1, f"{command}: expected one new run folder, found {sorted(new)}"
        return new.pop().relative_to(self.root)

    def client(self) -> MlflowClient:
        return MlflowClient(f"sqlite:///{self.root / 'mlflow.db'}")


def _venv_is_current() -> bool:
    stamp = REPO_DIR / ".venv" / ".installed"
    cksum = subprocess.run(
        "cksum < pyproject.toml", shell=True, cwd=REPO_DIR, capture_output=True, text=True
    ).stdout.strip()
    return stamp.is_file() and stamp.read_text().strip().endswith(cksum)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory) -> Checkout:
    if not _venv_is_current():
        pytest.skip("run `make setup` first: the README's commands use .venv as `make setup` leaves it")
    root = tmp_path_factory.mktemp("readme") / "asr-sweeps"
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO_DIR, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for name in filter(None, files):
        source = REPO_DIR / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (REPO_DIR / "data").mkdir(exist_ok=True)
    (root / ".venv").symlink_to(REPO_DIR / ".venv")
    (root / "data").symlink_to(REPO_DIR / "data")  # the generated corpus and feature cache, as on the user's disk
    return Checkout(root, _user_data(tmp_path_factory.mktemp("user-data")))


def _user_data(folder: Path) -> dict[str, str]:
    """The user's data sets, in the documented layouts, made from the built-in corpus."""
    corpus = load_splits(compose_cfg().dataset)  # the default corpus, as `make train` speaks it
    rows = {split: list(corpus[split]) for split in ("train", "dev", "test")}
    ne = folder / "ne"
    ne.mkdir()
    for split, split_rows in rows.items():
        with (ne / f"{split}.jsonl").open("w", encoding="utf-8") as out:
            for r in split_rows[:200]:
                out.write(
                    json.dumps(
                        {
                            "audio_filepath": r["audio_path"],
                            "text": r["text"],
                            "duration": 0.0,
                            "speaker": r["speaker"],
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )
    openslr = folder / "openslr54"
    lines = []
    for index, r in enumerate(rows["train"][:400]):
        utt_id = hashlib.sha1(r["id"].encode()).hexdigest()[:10]
        target = openslr / "data" / utt_id[:2] / f"{utt_id}.flac"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(r["audio_path"], target)
        lines.append(f"{utt_id}\tspk{index % 100:03d}\t{r['text']}।")
    (openslr / "utt_spk_text.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    schema = pa.schema(
        [("audio", pa.struct([("bytes", pa.binary()), ("path", pa.string())])), ("transcription", pa.string())],
        metadata={
            "huggingface": json.dumps(
                {
                    "info": {
                        "features": {
                            "audio": {"_type": "Audio"},
                            "transcription": {"dtype": "string", "_type": "Value"},
                        }
                    }
                }
            )
        },
    )
    for split, count in (("train", 200), ("test", 40)):
        chosen = rows[split][:count]
        table = {
            "audio": [{"bytes": Path(r["audio_path"]).read_bytes(), "path": f"{r['id']}.flac"} for r in chosen],
            "transcription": [r["text"] for r in chosen],
        }
        pq.write_table(pa.Table.from_pydict(table, schema=schema), folder / f"{split}.parquet")
    return {
        "/data/ne": str(ne),
        "/data/openslr54": str(openslr),
        "/data/train.parquet": str(folder / "train.parquet"),
        "/data/test.parquet": str(folder / "test.parquet"),
        "/shared/openslr54": str(openslr),
    }


def _metrics(checkout: Checkout, run: Path) -> dict:
    return json.loads((checkout.root / run / "metrics.json").read_text())


# ---- quick start ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def run_a(checkout) -> Path:
    """`make train`, at debug size: run folder A of the evaluate commands."""
    return checkout.new_run("make train", FAST)


@pytest.fixture(scope="module")
def run_b(checkout) -> Path:
    """`python train.py debug=fast`: run folder B of the compare command."""
    return checkout.new_run(".venv/bin/python train.py debug=fast")


def test_make_train(checkout, run_a):
    metrics = _metrics(checkout, run_a)
    assert metrics["train_steps"] == 30 and 0 <= metrics["test_wer"] <= 1.5
    run_id = json.loads((checkout.root / run_a / "mlflow_run.json").read_text())["run_id"]
    run = checkout.client().get_run(run_id)  # filed in the checkout's own ./mlflow.db, as the README says
    assert run.info.status == "FINISHED" and run.data.metrics["test_wer"] == pytest.approx(metrics["test_wer"])
    experiment = checkout.client().get_experiment(run.info.experiment_id)
    assert (
        experiment.name == "asr-synthetic_ne" and experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    )


def test_make_test(checkout):
    """This suite is what `make test` runs; running it again from here would recurse. Check the target's command."""
    dry = checkout.run("make -n test").stdout
    assert "-m pytest" in dry and "not slow" in dry


def test_train_debug_fast(checkout, run_b):
    assert (checkout.root / run_b / "model" / "config.json").is_file()
    assert (checkout.root / run_b / "predictions_test.jsonl").is_file()


def test_train_with_overrides(checkout):
    run = checkout.new_run(".venv/bin/python train.py trainer.epochs=3 trainer.lr=1e-3", FAST)
    config = (checkout.root / run / ".hydra" / "config.yaml").read_text()
    assert re.search(r"\n  epochs: 3\n", config) and re.search(r"\n  lr: 0\.001\n", config)


def test_train_help(checkout):
    out = checkout.run(".venv/bin/python train.py --help").stdout
    for group in ("dataset: hf_hub, manifest, openslr54, synthetic_ne", "trainer: cpu, gpu_fast, seed", "debug: fast"):
        assert group in out


def test_make_setup_with_a_cuda_torch(checkout):
    """Composed, not run: it would download a CUDA build of torch. The recipe must pass TORCH to pip as typed."""
    dry = checkout.run('make -n setup TORCH="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"').stdout
    assert "pip install --quiet torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" in dry


def test_make_ui(checkout, run_a):
    port = helpers.free_port()
    server = subprocess.Popen(
        ["bash", "-c", f"make ui PORT={port}"],
        cwd=checkout.root,
        env=checkout.env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline, page = time.monotonic() + 120, None
        while time.monotonic() < deadline and page is None:
            assert server.poll() is None, server.stderr.read().decode()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as response:
                    page = response.read().decode()
            except OSError:
                time.sleep(1)
        assert page and "MLflow" in page, "make ui did not answer HTTP within 120 s"
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}/ajax-api/2.0/mlflow/experiments/search?max_results=50", timeout=10
        ) as response:
            names = [e["name"] for e in json.load(response)["experiments"]]
        assert "asr-synthetic_ne" in names  # it serves the store the runs were filed in
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)


# ---- your data -----------------------------------------------------------------------------------


def test_train_on_a_manifest(checkout):
    run = checkout.new_run(
        ".venv/bin/python train.py dataset=manifest dataset.train=/data/ne/train.jsonl "
        "dataset.dev=/data/ne/dev.jsonl dataset.test=/data/ne/test.jsonl",
        FAST,
    )
    assert _metrics(checkout, run)["train_steps"] == 30


def test_train_on_openslr54(checkout):
    run = checkout.new_run(".venv/bin/python train.py dataset=openslr54 dataset.root=/data/openslr54", FAST)
    audit = json.loads((checkout.root / run / "data_audit.json").read_text())
    assert 0 < audit["rows"] <= 16 + 16 + 64 and _metrics(checkout, run)["train_steps"] == 30


def test_audit_openslr54(checkout):
    result = checkout.run(".venv/bin/python -m asr.audit dataset=openslr54 dataset.root=/data/openslr54")
    assert re.search(r"audit: 400 rows, \d+ quarantined", result.stdout + result.stderr)


def test_train_on_parquet(checkout):
    run = checkout.new_run(
        ".venv/bin/python train.py dataset=hf_hub dataset.path=parquet dataset.splits.dev=null "
        "'dataset.data_files={train: /data/train.parquet, test: /data/test.parquet}'",
        FAST,
    )
    assert _metrics(checkout, run)["train_steps"] == 30


def test_gpu_recipes_plan(checkout):
    """Planned, not run (`plan=true` appended: the config composed and checked, the data found, the GPU-hours
    printed, nothing trained): they need a GPU and the w2v-bert-2.0 checkpoint from the Hub."""
    for command in (
        ".venv/bin/python train.py experiment=seed dataset=openslr54 dataset.root=/data/openslr54",
        ".venv/bin/python train.py model=w2v_bert_2 trainer=gpu_fast dataset=openslr54 dataset.root=/data/openslr54",
    ):
        out = checkout.run(command, "plan=true").stdout
        assert "H200 GPU-hours" in out and "data: present" in out and "nothing submitted" in out


# ---- grids and sweeps ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def epoch_grid(checkout) -> str:
    checkout.run(".venv/bin/python train.py -m trainer.epochs=8,20,40", FAST)
    client = checkout.client()
    experiment = client.get_experiment_by_name("asr-synthetic_ne")
    parent = client.search_runs(
        [experiment.experiment_id], "tags.sweep_role = 'parent'", order_by=["attributes.start_time DESC"]
    )[0]
    return parent.info.run_id


def test_epoch_grid(checkout, epoch_grid):
    client = checkout.client()
    parent = client.get_run(epoch_grid)
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{epoch_grid}'")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert sorted(int(c.data.params["swept.trainer.epochs"]) for c in children) == [8, 20, 40]
    sweep_dir = Path(parent.data.tags["sweep_dir"])
    assert (sweep_dir / "summary.csv").is_file() and list(sweep_dir.glob("wer_vs_*.png"))


def test_make_compare(checkout, epoch_grid):
    out = checkout.run("make compare").stdout
    assert f"Sweep {epoch_grid}" in out and all(re.search(rf"\b{e}\b", out) for e in (8, 20, 40))


def test_epoch_grid_sharing_a_trunk(checkout):
    """The 8/20/40 grid as one trunk + three branches, at debug size (debug=fast's step cap lifted: a branch
    grid runs whole epochs)."""
    command = ".venv/bin/python train.py -m trainer.epochs=8,20,40 trainer.lr_scheduler=wsd hydra/sweeper=branches"
    result = checkout.run(command, FAST, "trainer.max_steps=null", "trainer.eval_steps=100")
    trunk_dir = Path(re.search(r"branch\.trunk_dir=(\S+)", result.stdout + result.stderr).group(1))
    assert trunk_dir.parent == checkout.root / "outputs" / "trunks"  # where a rerun finds it
    compute = json.loads(sorted((checkout.root / "multirun").glob("*/*/branches.json"))[-1].read_text())
    # 8 steps per epoch: 64 + 160 + 320 steps alone; the trunk to 256, then 13 + 32 + 64 of cooldown
    assert compute["independent_steps"] == 544 and compute["compute_steps"] == 256 + 13 + 32 + 64
    client = checkout.client()
    parents = client.search_runs(
        [client.get_experiment_by_name("asr-synthetic_ne").experiment_id],
        "tags.sweep_role = 'parent'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    children = client.search_runs(
        [parents[0].info.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'"
    )
    assert sorted(c.data.tags.get("branch_role") for c in children) == ["branch", "branch", "branch", "trunk"]
    assert parents[0].data.metrics["compute_ratio"] == pytest.approx(365 / 544)


@pytest.fixture(scope="module")
def cpu_demo_study(checkout) -> Path:
    """`make sweep` at debug size: 2 trials of 30 steps on the default study's 2 workers."""
    result = checkout.run("make sweep", FAST, "sweep.n_trials=2", "trainer.eval_steps=10")
    study_dir = checkout.root / "outputs" / "sweeps" / "cpu_demo-synthetic_ne-tiny"
    assert (study_dir / "leaderboard.csv").is_file(), result.stdout[-3000:]
    return study_dir


def test_make_sweep(checkout, cpu_demo_study):
    import optuna

    study = optuna.load_study(
        study_name="cpu_demo-synthetic_ne-tiny", storage=f"sqlite:///{cpu_demo_study / 'optuna.db'}"
    )
    finished = [t for t in study.trials if t.state.is_finished()]
    assert len(finished) == 2 and all(t.state.name in ("COMPLETE", "PRUNED") for t in finished)
    config = (cpu_demo_study / "trial_0000" / ".hydra" / "config.yaml").read_text()
    assert re.search(r"\n  eval_steps: 10\n", config)  # the command line's 10 beats the study file's 100
    assert len(list((cpu_demo_study / "workers").glob("worker_*.log"))) == 2


def test_sweep_report_only(checkout, cpu_demo_study):
    (cpu_demo_study / "leaderboard.csv").unlink()
    out = checkout.run(".venv/bin/python sweep.py sweep.report_only=true").stdout
    assert (
        (cpu_demo_study / "leaderboard.csv").is_file()
        and (cpu_demo_study / "best.yaml").is_file()
        and "Best: trial" in out
    )


def test_rerun_the_best_trial(checkout, cpu_demo_study):
    best = (checkout.root / "conf" / "experiment" / "best_cpu_demo_synthetic_ne_tiny.yaml").read_text()
    lr = re.search(r"\n  lr: ([0-9.e-]+)", best).group(1)
    run = checkout.new_run(".venv/bin/python train.py experiment=best_cpu_demo_synthetic_ne_tiny", FAST)
    assert f"\n  lr: {lr}\n" in (checkout.root / run / ".hydra" / "config.yaml").read_text()


def test_grid_study_with_two_workers(checkout):
    checkout.run(".venv/bin/python sweep.py sweep=grid_epochs_lr sweep.workers=2", FAST, "sweep.n_trials=2")
    import optuna

    db = checkout.root / "outputs" / "sweeps" / "grid_epochs_lr-synthetic_ne-tiny" / "optuna.db"
    trials = optuna.load_study(study_name="grid_epochs_lr-synthetic_ne-tiny", storage=f"sqlite:///{db}").trials
    done = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(done) == 2 and len({json.dumps(t.params, sort_keys=True) for t in done}) == 2  # two distinct grid points


def test_optuna_sweeper_door(checkout):
    checkout.run(
        ".venv/bin/python train.py -m hydra/sweeper=optuna 'trainer.lr=tag(log,interval(1e-4,3e-2))' "
        "trainer.epochs=2,4 hydra.sweeper.n_trials=12 hydra.sweeper.workers=2",
        FAST,
        "hydra.sweeper.n_trials=2",
    )
    client = checkout.client()
    experiment = client.get_experiment_by_name("asr-synthetic_ne")
    parents = client.search_runs(
        [experiment.experiment_id],
        "tags.sweep_role = 'parent' AND tags.launcher = 'optuna'",
        order_by=["attributes.start_time DESC"],
    )
    children = client.search_runs([experiment.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    assert len(children) == 2 and all(c.data.params["swept.trainer.epochs"] in ("2", "4") for c in children)


def test_cluster_commands_plan(checkout):
    """Planned, not submitted (`plan=true` appended): every job's config is composed and checked and the
    GPU-hours printed. The same commands at test size run on a real one-node SLURM + PostgreSQL + MLflow
    server in tests/test_cluster.py."""
    grid, study = [c for c in readme_commands() if "hydra/launcher=slurm" in c]
    out = checkout.run(grid, "plan=true").stdout
    assert (
        "(slurm launcher)" in out
        and all(f"trainer.epochs={e}" in out for e in (8, 20, 40))
        and "nothing submitted" in out
    )
    out = checkout.run(study, "plan=true").stdout
    assert "(x40 trials)" in out and "nothing submitted" in out


# ---- evaluate, compare, transcribe ----------------------------------------------------------------


def test_evaluate_a_run_folder(checkout, run_a):
    checkout.run(f".venv/bin/python -m asr.evaluate run_dir={RUN_A}", **{RUN_A: str(run_a)})
    report = json.loads(sorted(checkout.root.glob("outputs/evaluate/*/*/report.json"))[-1].read_text())
    assert report["wer"] == pytest.approx(_metrics(checkout, run_a)["test_wer"])  # as training scored it


def test_evaluate_an_mlflow_run(checkout, run_a):
    run_id = json.loads((checkout.root / run_a / "mlflow_run.json").read_text())["run_id"]
    checkout.run(f".venv/bin/python -m asr.evaluate mlflow_run={RUN_ID} split=dev", **{RUN_ID: run_id})
    report = json.loads(sorted(checkout.root.glob("outputs/evaluate/*/*/report.json"))[-1].read_text())
    assert report["source"]["split"] == "dev" and report["source"]["training_run"] == run_id
    evaluations = checkout.client().search_runs(
        [checkout.client().get_run(run_id).info.experiment_id], f"tags.evaluates_run_id = '{run_id}'"
    )
    assert evaluations and "dev_wer" in evaluations[0].data.metrics


def test_evaluate_a_model_folder_on_a_manifest(checkout, run_a):
    checkout.run(
        f".venv/bin/python -m asr.evaluate model_dir={RUN_A}/model dataset=manifest "
        "dataset.train=/data/ne/train.jsonl dataset.test=/data/ne/test.jsonl",
        **{RUN_A: str(run_a)},
    )
    report = json.loads(sorted(checkout.root.glob("outputs/evaluate/*/*/report.json"))[-1].read_text())
    assert report["source"]["dataset"] == "manifest" and report["utterances"] == 100


def test_compare_two_runs(checkout, run_a, run_b):
    out = checkout.run(
        f".venv/bin/python -m asr.evaluate 'compare=[{RUN_A},{RUN_B}]'", **{RUN_A: str(run_a), RUN_B: str(run_b)}
    ).stdout
    assert f"A = {run_a}" in out and re.search(r"(better|worse) than A|no significant difference", out)


def test_transcribe_files(checkout, run_a):
    corpus = load_splits(compose_cfg().dataset)["test"]
    audio, rate = sf.read(corpus[0]["audio_path"])
    sf.write(checkout.root / "talk.flac", audio, rate)
    stereo = soxr.resample(np.stack([audio, audio], axis=1), rate, 44100)  # a phone call: stereo, 44.1 kHz
    sf.write(checkout.root / "call.wav", stereo, 44100)
    out = checkout.run(
        f".venv/bin/python -m asr.transcribe {RUN_A}/model talk.flac call.wav", **{RUN_A: str(run_a)}
    ).stdout
    lines = out.strip().splitlines()
    assert [line.split("\t")[0] for line in lines] == ["talk.flac", "call.wav"]


# ---- language-model decoding ----------------------------------------------------------------------


def test_lm_build_tune_and_evaluate(checkout, run_a):
    """On a copy of run A (the other evaluate tests need run A without an LM)."""
    run = run_a.parent / f"{run_a.name}-lm"
    shutil.copytree(checkout.root / run_a, checkout.root / run)
    folder = {RUN_A: str(run)}
    checkout.run(f".venv/bin/python -m asr.lm build run_dir={RUN_A}", **folder)
    assert (checkout.root / run / "model" / "lm" / "unigrams.txt").is_file()
    checkout.run(f".venv/bin/python -m asr.lm tune run_dir={RUN_A}", "lm.tune.trials=3", **folder)
    tuned = json.loads((checkout.root / run / "model" / "lm" / "lm.json").read_text())
    assert {"alpha", "beta"} <= set(tuned)
    checkout.run(f".venv/bin/python -m asr.evaluate run_dir={RUN_A} decoder=beam_lm", **folder)
    report = json.loads(sorted(checkout.root.glob("outputs/evaluate/*/*/report.json"))[-1].read_text())
    assert report["decoding"]["decoder"] == "beam_lm" and "verdict" in report["versus_greedy"]["wer"]


def test_train_with_the_lm_after_training(checkout):
    run = checkout.new_run(".venv/bin/python train.py lm.after_training=true", FAST, "lm.tune.trials=3")
    metrics = _metrics(checkout, run)
    assert "test_lm_wer" in metrics and (checkout.root / run / "model" / "lm" / "lm.json").is_file()

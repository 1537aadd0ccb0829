"""Sinks: metrics.jsonl, progress, wandb offline (read back from the .wandb file), failures."""

import json
import logging
import struct
import time
import warnings

import numpy as np
import pytest
from omegaconf import OmegaConf

from scu_sweep.redact import scrub
from scu_sweep.tracking import progress, sinks as sk, wandb_sink

FAKE_KEY = "f" * 8 + "0123456789abcdef0123456789abcdef"


def _cfg(logger="none", **extra):
    return OmegaConf.create({
        "target_s": 0.03, "train": {"steps": 30}, "prior": {"sigma": 0.1},
        "logger": {"name": logger, "mode": "offline", "project": "scu_test", "entity": None,
                   "group": None, "tags": ["t1"], "log_adapter": True},
        "pruning": {"trial_number": None}, **extra})


def _row(step):
    return {"step": step, "loss": 3.0 / step, "data_bpt": 4.0 / step, "param_bpt": 0.1,
            "s_ratio": 0.03, "s_ema": 0.03, "lambda": 0.5 + step / 100, "integral": 0.0,
            "lr": 1e-3, "tokens": 64 * step, "wall_s": 0.1 * step, "tokens_per_s": 640.0}


def _adapter(d):
    from safetensors.numpy import save_file

    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    save_file({"model.layers.0.self_attn.q_proj.lora_a": rng.normal(size=(8, 2)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.lora_b": rng.normal(size=(2, 8)).astype(np.float32)},
              str(d / "adapters.safetensors"))
    (d / "adapter_config.json").write_text(json.dumps({
        "fine_tune_type": "lora", "num_layers": 1, "model": "base",
        "lora_parameters": {"rank": 2, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}}))
    return d


SUMMARY = {"target_s": 0.03, "stop_reason": "saturated", "saturation_step": 20,
           "adapter_step": 20, "steps_run": 20, "train_tokens": 1000, "prior_sigma": 0.1,
           "final": {"loss": 0.15, "val_data_bpt": float("nan")}, "tokens_per_s": 640.0}


def test_jsonl_flushed_per_line_and_nan_as_null(tmp_path):
    s = sk.JsonlSink(tmp_path)
    s.log(_row(1))
    s.log(dict(_row(2), val_data_bpt=float("nan")))
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()  # before close
    assert [json.loads(x) for x in lines] == [_row(1), dict(_row(2), val_data_bpt=None)]
    s.close(ok=True)


def test_quiet_progress_every_n_steps(caplog):
    p = progress.ProgressSink("job 3", total=30, target=0.03, tty=False, every=10)
    with caplog.at_level(logging.INFO, logger="scu_sweep.progress"):
        for i in range(1, 31):
            p.log(_row(i))
        p.summary(SUMMARY, None)
    msgs = [r.getMessage() for r in caplog.records]
    assert [m.split()[3] for m in msgs[:-1]] == ["1/30", "10/30", "20/30", "30/30"]
    assert "S 3%/3%" in msgs[1] and "λ 0.6 " in msgs[1] and "640 tok/s" in msgs[1]
    assert msgs[-1].startswith("[job 3] done: saturated at step 20 (saturation 20)")


def test_the_done_line_names_each_s_of_the_kept_adapter(caplog):
    """Raw S (that batch), Ŝ (what the controller held) and S from validation (what the keep
    rule judged) differ once training blocks repeat: the line must not show the first alone."""
    final = dict(_row(50), s_ratio=0.0396, s_ema=0.03136, val_data_bpt=3.562, val_s_ratio=0.03131)
    p = progress.ProgressSink("job 1", total=300, target=0.03, tty=False)
    with caplog.at_level(logging.INFO, logger="scu_sweep.progress"):
        p.summary(dict(SUMMARY, final=final), None)
    line = caplog.records[-1].getMessage()
    assert "S 3.96%/3%  Ŝ 3.14%  val S 3.13%  λ 1  DataBPT 0.08  val 3.562" in line


@pytest.mark.parametrize("columns, info", [
    (200, "S 3%/5%  Ŝ 3%  λ 0.56  DataBPT 0.6667  640 tok/s"),
    (60, "S 3%/5%  Ŝ 3%  λ 0.56  Da…"),  # cut to fit a narrow terminal, never wrapped
])
def test_rich_progress_fields(monkeypatch, columns, info):
    monkeypatch.setenv("COLUMNS", str(columns))
    p = progress.ProgressSink("run", total=30, target=0.05, tty=True)
    p.log(_row(6))
    task = p._bar.tasks[0]
    assert task.completed == 6 and task.total == 30 and task.fields["info"] == info
    console = p._bar.console
    with console.capture() as cap:
        console.print(p._bar.get_renderable())
    lines = cap.get().rstrip("\n").split("\n")
    assert len(lines) == 1 and len(lines[0]) <= columns and info in lines[0]
    p.close(ok=True)


def test_scrub_keys_and_env_values(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", "hf_abcdefghijkl")
    cfg = {"a": {"api_key": "x", "hf_token": "y", "max_tokens": 5, "path": "hf_abcdefghijkl"},
           "tags": ["ok", "hf_abcdefghijkl"], "password": "p", "tokens_seen": 3}
    assert scrub(cfg) == {"a": {"max_tokens": 5}, "tags": ["ok"], "tokens_seen": 3}


def test_sweep_dir_fallback_and_group(tmp_path):
    sweep = tmp_path / "2026-11-25" / "15-31-46"
    (sweep / "3").mkdir(parents=True)
    assert sk.sweep_dir(sweep / "3") is None  # no multirun.yaml: a single run
    (sweep / "multirun.yaml").write_text("{}\n")
    assert sk.sweep_dir(sweep / "3") == sweep
    assert wandb_sink.group_name(sweep) == "2026-11-25_15-31-46"
    assert wandb_sink.group_name(tmp_path / "my_sweep") == "my_sweep"


def test_make_sinks_none_writes_plot_and_card(tmp_path):
    run = tmp_path / "run"
    with sk.make_sinks(_cfg(), run) as s:
        assert [type(x).__name__ for x in s.sinks] == ["JsonlSink", "ProgressSink"]
        for i in range(1, 21):
            s.log(_row(i))
        s.summary(SUMMARY, _adapter(run / "adapters"))
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 20
    assert (run / "scu_run.png").stat().st_size > 10_000
    assert (run / "adapters" / "README.md").exists()
    assert (run / "adapters" / "parameter_analysis.json").exists()


def test_failed_run_still_plots(tmp_path):
    s = sk.make_sinks(_cfg(), tmp_path)
    s.log(_row(1))
    s.close()
    assert (tmp_path / "scu_run.png").exists()


# --- wandb ------------------------------------------------------------------------

def _wandb_records(path):
    """Records of a .wandb file (LevelDB-log framing: 32 KiB blocks, 7-byte headers)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    i, buf, out = 7, b"", []
    while i + 7 <= len(data):
        space = 32768 - i % 32768
        if space < 7:
            i += space
            continue
        _, n, kind = struct.unpack("<IHB", data[i:i + 7])
        if i + 7 + n > len(data):  # a record still being written
            break
        if kind == 0 and n == 0:
            i += space
            continue
        buf, i = buf + data[i + 7:i + 7 + n], i + 7 + n
        if kind in (1, 4):  # FULL or LAST fragment
            rec = pb.Record()
            rec.ParseFromString(buf)
            out.append(rec)
            buf = b""
    return out


@pytest.fixture
def wandb_env(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    for k in ("WANDB_MODE", "WANDB_DISABLED", "WANDB_RUN_GROUP", "WANDB_PROJECT"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    for k in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(k, str(tmp_path / "wandb_home"))


@pytest.mark.slow
def test_wandb_offline_run_contents(tmp_path, wandb_env):
    sweep = tmp_path / "sweep"
    run = sweep / "0"
    (run / ".hydra").mkdir(parents=True)
    (sweep / "multirun.yaml").write_text("{}\n")
    (run / ".hydra" / "overrides.yaml").write_text("- target_s=0.03\n")
    cfg = _cfg("wandb", extra={"api_key": "x", "from_env": "${oc.env:WANDB_API_KEY}", "n": 1})
    s = sk.make_sinks(cfg, run)
    for i in range(1, 21):
        s.log(_row(i))
    s.summary(SUMMARY, _adapter(run / "adapters"))
    s.close()
    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    deadline = time.time() + 30  # wandb-core may still be flushing after finish() returns
    while True:
        recs = _wandb_records(files[0])
        if any(x.WhichOneof("record_type") == "exit" for x in recs):
            break
        assert time.time() < deadline, "no exit record in the .wandb file"
        time.sleep(0.2)
    r = next(x.run for x in recs if x.WhichOneof("record_type") == "run")
    conf = {u.key: json.loads(u.value_json) for u in r.config.update}
    assert conf["target_s"] == 0.03 and conf["overrides"] == ["target_s=0.03"]
    assert conf["extra"] == {"n": 1}  # api_key and the env-resolved key are gone
    assert r.run_group == "sweep" and r.job_type == "sweep-job" and list(r.tags) == ["t1"]
    hist = [{i.nested_key[0]: json.loads(i.value_json) for i in x.history.item}
            for x in recs if x.WhichOneof("record_type") == "history"]
    steps = [h for h in hist if "lambda" in h]
    assert [h["step"] for h in steps] == list(range(1, 21))
    assert steps[4]["lambda"] == 0.55 and steps[4]["s_ratio"] == 0.03
    summ = {}
    for x in recs:
        if x.WhichOneof("record_type") == "summary":
            summ.update({(u.key or u.nested_key[0]): json.loads(u.value_json) for u in x.summary.update})
    assert summ["stop_reason"] == "saturated" and summ["saturation_step"] == 20
    arts = [x.artifact for x in recs if x.WhichOneof("record_type") == "artifact"]
    assert len(arts) == 1 and arts[0].type == "model"
    assert {e.path for e in arts[0].manifest.contents} >= {"adapters.safetensors", "README.md"}
    for f in tmp_path.rglob("*"):
        if f.is_file():
            assert FAKE_KEY.encode() not in f.read_bytes(), f


class _FlakyRun:
    def __init__(self, fail_at):
        self.calls, self.fail_at, self.finished = 0, fail_at, []
        self.summary = {}

    def define_metric(self, *a, **k):
        pass

    def log(self, row):
        self.calls += 1
        if self.calls == self.fail_at:
            raise ConnectionError("network down")

    def finish(self, exit_code=0):
        self.finished.append(exit_code)


def test_wandb_failure_warns_once_and_disables(tmp_path, wandb_env, monkeypatch):
    import wandb

    fake = _FlakyRun(fail_at=3)
    monkeypatch.setattr(wandb, "init", lambda **k: fake)
    s = sk.make_sinks(_cfg("wandb"), tmp_path)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for i in range(1, 11):
            s.log(_row(i))
        s.summary(SUMMARY, None)
        s.close()
    msgs = [str(x.message) for x in w if "wandb" in str(x.message)]
    assert len(msgs) == 1 and "network down" in msgs[0]
    assert fake.calls == 3 and fake.finished == [1]  # no calls after the failure
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 10


def test_wandb_init_failure_keeps_training(tmp_path, wandb_env, monkeypatch):
    import wandb

    def boom(**k):
        raise RuntimeError("bad key")

    monkeypatch.setattr(wandb, "init", boom)
    with pytest.warns(RuntimeWarning, match="wandb init failed.*bad key"):
        s = sk.make_sinks(_cfg("wandb"), tmp_path)
    s.log(_row(1))
    s.close()
    assert (tmp_path / "metrics.jsonl").exists()

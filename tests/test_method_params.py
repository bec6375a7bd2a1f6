"""Every method validates its own `method.*` keys, registry-wide: each key of `defaults` has a declared
rule, and each invalid value is a one-line error naming the key, raised before anything is built.

Two independent sources of invalid values: the rules' own refused examples, and a sweep written here
from what the keys mean (zero and negative sizes, counts, temperatures and probabilities; unknown
names; non-booleans) that does not read the rules at all."""
import pytest
from omegaconf import OmegaConf

from pretrain.config import ConfigError, load_config
from pretrain.methods import METHODS, create_method

GEN = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
#: keys where zero is meaningful: a momentum/EMA decay of 0 copies the online network, beta = 0 is a plain
#: autoencoder, r1 = 0 turns the penalty off, CPC's context may be a single 1x1 conv
ZERO_OK = {("moco_v2", "momentum"), ("moco_v3", "momentum"), ("byol", "momentum"), ("cpc", "context_layers"), ("vae", "beta"),
           ("gan", "r1"), ("gan", "ema_decay"), ("ddpm", "ema_decay"),
           # SwAV: no local crops (its 2x224 variant), no queue, the queue from the start, no prototype freeze
           ("swav", "num_local_crops"), ("swav", "queue_length"), ("swav", "epoch_queue_starts"),
           ("swav", "freeze_prototypes_epochs"),
           # the papers' ablations that drop a term (Barlow Twins' lambda, VICReg's coefficients)
           ("barlow_twins", "lambd"), ("vicreg", "sim_coeff"), ("vicreg", "std_coeff"), ("vicreg", "cov_coeff")}


def _cfg(name, key=None, value=None):
    cfg = load_config(None, ["data.train=unused", "model.name=resnet10t", "data.image_size=16", f"method.name={name}"]
                      + (GEN if hasattr(METHODS.get(name), "sample") else []))
    if key is not None:
        cfg.method[key] = value
    return cfg


#: keys that are a fraction of something (a decay per step): above 1 means nothing
FRACTIONS = {"momentum", "ema_decay"}


def _sweep(key, default):
    """Values of the kind `default` is that no hyper-parameter of these methods means anything with."""
    if isinstance(default, bool):
        return ["maybe", 3]
    if isinstance(default, (int, float)):
        return [0, -1] + ([1.5] if key in FRACTIONS else [])
    if default is None:   # "derive it" (SimSiam's projector width: the backbone's); a value must still be sane
        return [0, -1, "x"]
    if isinstance(default, str):
        return ["no_such_option"]
    if isinstance(default, (list, tuple)):
        return [[], [0], [-1]]
    raise AssertionError(f"no sweep for a default of type {type(default).__name__}")


def _refused(name, key, value):
    with pytest.raises((ConfigError, ValueError)) as e:
        create_method(_cfg(name, key, value))
    msg = str(e.value)
    assert f"method.{key}" in msg and "\n" not in msg, msg
    return msg


@pytest.mark.parametrize("name", METHODS.names())
def test_every_key_has_a_rule_the_default_passes(name):
    cls = METHODS.get(name)
    assert set(cls.checks) == set(cls.defaults), f"{name}: keys without a rule: {set(cls.defaults) - set(cls.checks)}"
    for key, value in cls.defaults.items():
        cls.checks[key].check(key, value)


CASES = [(n, k, v) for n in METHODS.names() for k, rule in getattr(METHODS.get(n), "checks", {}).items() for v in rule.invalid]


@pytest.mark.parametrize("name,key,value", CASES, ids=[f"{n}.{k}={v!r}" for n, k, v in CASES])
def test_rule_examples_are_refused(name, key, value):
    _refused(name, key, value)


SWEEP = [(n, k, v) for n in METHODS.names() for k, d in METHODS.get(n).defaults.items() for v in _sweep(k, d)
         if not (v == 0 and not isinstance(v, bool) and (n, k) in ZERO_OK)]


@pytest.mark.parametrize("name,key,value", SWEEP, ids=[f"{n}.{k}={v!r}" for n, k, v in SWEEP])
def test_meaningless_values_are_refused_before_building(name, key, value, monkeypatch):
    """Refused with a one-line error naming the key, and before the backbone is built."""
    import pretrain.models as models

    def no_build(*a, **kw):
        raise AssertionError("the backbone was built before method.* was validated")
    monkeypatch.setattr(models, "create_backbone", no_build)
    with pytest.raises(ConfigError) as e:
        create_method(_cfg(name, key, value))
    assert f"method.{key}" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("name,key", sorted(ZERO_OK))
def test_zero_where_it_means_something(name, key):
    assert create_method(_cfg(name, key, 0)) is not None


def test_cli_bad_method_value(capsys, tmp_path, digits_shards):
    """The issue's example: `method.bound_samples=0` from the command line is one `error:` line, exit 2."""
    from helpers import inproc_error_line

    exp = tmp_path / "ddpm.yaml"
    exp.write_text("method:\n  name: ddpm\ndata:\n  mean: [0.5, 0.5, 0.5]\n  std: [0.5, 0.5, 0.5]\n")
    line = inproc_error_line(capsys, "train", exp, f"data.train={digits_shards}/train", f"run_dir={tmp_path}/run",
                             "method.bound_samples=0")
    assert "method.bound_samples" in line and "got 0" in line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_lists_from_the_config_reach_the_rule_as_lists():
    """OmegaConf hands ListConfig, not list: the rule must still see a list (DDPM's channel_mults)."""
    cfg = _cfg("ddpm")
    cfg.method.channel_mults = OmegaConf.create([1, 2])
    assert create_method(cfg) is not None

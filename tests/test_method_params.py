"""Every method validates its own `method.*` keys, registry-wide: each key of `defaults` has a declared
rule, and each invalid value is a one-line error naming the key, raised before anything is built.

Two independent sources of invalid values: the rules' own refused examples, and a sweep written here
from what the keys mean (zero and negative sizes, counts, temperatures and probabilities; unknown
names; non-booleans) that does not read the rules at all."""
import pytest
from omegaconf import OmegaConf

from pretrain.config import ConfigError, load_config
from pretrain.methods import METHODS, create_method
from pretrain.params import validate

GEN = ["data.mean=[0.5,0.5,0.5]", "data.std=[0.5,0.5,0.5]"]
#: keys where zero is meaningful: a momentum/EMA decay of 0 copies the online network, beta = 0 is a plain
#: autoencoder, r1 = 0 turns the penalty off, CPC's context may be a single 1x1 conv
ZERO_OK = {("moco_v2", "momentum"), ("moco_v3", "momentum"), ("byol", "momentum"), ("dino", "momentum"), ("ibot", "momentum"), ("cpc", "context_layers"), ("vae", "beta"),
           ("gan", "r1"), ("gan", "ema_decay"), ("ddpm", "ema_decay"), ("flow", "ema_decay"),
           # the denoisers: a DiT's named size (dit_* = 0), unconditional (num_classes = 0), no label dropout, a
           # latent scale estimated from the data (latent_scale = 0)
           *[(m, k) for m in ("ddpm", "flow") for k in ("dit_depth", "dit_hidden", "dit_heads", "num_classes",
                                                         "label_dropout", "latent_scale")],
           # SwAV: no local crops (its 2x224 variant), no queue, the queue from the start, no prototype freeze
           ("swav", "num_local_crops"), ("swav", "queue_length"), ("swav", "epoch_queue_starts"),
           ("swav", "freeze_prototypes_epochs"),
           # the papers' ablations that drop a term (Barlow Twins' lambda, VICReg's coefficients)
           ("barlow_twins", "lambd"), ("vicreg", "sim_coeff"), ("vicreg", "std_coeff"), ("vicreg", "cov_coeff"),
           # DINO/iBOT: the centre without memory, no clipping, no freeze, no local crops, no KoLeo, a frozen patch
           # embedding (MoCo v3's trick), no masking, the paper's loss ablations (iBOT lambda1/lambda2)
           *[(m, k) for m in ("dino", "ibot") for k in ("center_momentum", "clip_grad", "freeze_last_layer",
                                                         "num_local_crops", "koleo_weight", "patch_embed_lr_mult")],
           ("ibot", "mask_prob"), ("ibot", "cls_weight"), ("ibot", "patch_weight"),
           # I-JEPA: a target encoder that copies the context encoder; a context of any nonempty size
           ("ijepa", "momentum"), ("ijepa", "min_keep"),
           # fine-tuning: no label smoothing, no mixup / cutmix / mixing at all, only mixup (never CutMix)
           *[("finetune", k) for k in ("label_smoothing", "mixup_alpha", "cutmix_alpha", "mixup_prob", "mixup_switch_prob")]}


def _cfg(name, key=None, value=None):
    from helpers import SMALL_VIT

    cfg = load_config(None, ["data.train=unused", "model.name=resnet10t", "data.image_size=16", f"method.name={name}"]
                      + (GEN if hasattr(METHODS.get(name), "sample") else [])
                      + (SMALL_VIT if METHODS.get(name).requires_vit else []))
    if key is not None:
        cfg.method[key] = value
    return cfg


#: keys that are a fraction of something (a decay per step): above 1 means nothing
FRACTIONS = {"momentum", "ema_decay"}
#: keys that may be any real number (a location: the logit-normal's mean)
SIGNED = {"logit_mean"}


def _sweep(key, default):
    """Values of the kind `default` is that no hyper-parameter of these methods means anything with."""
    if isinstance(default, bool):
        return ["maybe", 3]
    if isinstance(default, (int, float)):
        return ["x"] if key in SIGNED else [0, -1] + ([1.5] if key in FRACTIONS else [])
    if default is None:   # "derive it" (SimSiam's projector width: the backbone's); a value must still be sane
        return [0, -1, "x"]
    if isinstance(default, str):
        return ["no_such_option"]
    if isinstance(default, (list, tuple)):
        return [[], [0], [-1]]
    if isinstance(default, dict):   # a schedule (pretrain/schedules.py): a bad endpoint, a bad shape, an unknown key
        start = default["start"]
        return ([{**default, "start": v} for v in _sweep(key, start)] + [{**default, "end": v} for v in _sweep(key, start)]
                + [{**default, "shape": "wiggly"}, {**default, "bogus": 1}, {k: v for k, v in default.items() if k != "start"}])
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
    validate(cls, dict(cls.defaults))   # a scheduled key's default may be a schedule: its endpoints are checked
    for key in cls.scheduled:
        assert key in cls.defaults, f"{name}: scheduled key {key} has no default"


@pytest.mark.parametrize("name", METHODS.names())
def test_a_schedule_for_a_key_read_once_is_refused(name):
    """Only the keys a method lists in `scheduled` may be schedule mappings; any other is a one-line error."""
    cls = METHODS.get(name)
    once = [k for k, v in cls.defaults.items() if k not in cls.scheduled and isinstance(v, (int, float))
            and not isinstance(v, bool)]
    if not once:
        pytest.skip(f"{name} has no numeric key read once")
    msg = _refused(name, once[0], {"shape": "cosine", "start": cls.defaults[once[0]], "end": cls.defaults[once[0]]})
    assert "cannot follow a schedule" in msg


CASES = [(n, k, v) for n in METHODS.names() for k, rule in getattr(METHODS.get(n), "checks", {}).items() for v in rule.invalid]


@pytest.mark.parametrize("name,key,value", CASES, ids=[f"{n}.{k}={v!r}" for n, k, v in CASES])
def test_rule_examples_are_refused(name, key, value):
    _refused(name, key, value)


def _zero(v) -> bool:
    """v is 0, or a schedule with an endpoint 0."""
    if isinstance(v, dict):
        return v.get("start") == 0 or (v.get("end") == 0 and "start" in v)
    return v == 0 and not isinstance(v, bool)


SWEEP = [(n, k, v) for n in METHODS.names() for k, d in METHODS.get(n).defaults.items() for v in _sweep(k, d)
         if not (_zero(v) and (n, k) in ZERO_OK)]


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

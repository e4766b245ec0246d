"""The flag edge: one grammar, every spelling one value or refused, values printing back."""

import pathlib

import pytest
from absl import flags as absl_flags
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ml_collections import config_flags

from tx.kernels import masks
from tx import flags
from tx.registry import Field, positive_int
from tx.train import configs

ROOT = pathlib.Path(__file__).resolve().parents[2]


# -- the grammar -------------------------------------------------------------------------------
@pytest.mark.parametrize("spelling, want", [
    ("local&strided", masks.Local(63) & masks.Strided(8)),
    ("local|global", masks.Local(63) | ((masks.Local(63) | masks.GlobalTokens((0,)))
                                        & masks.Causal())),
    ("(local|strided)&sparse", (masks.Local(63) | masks.Strided(8)) & masks.Strided(8)),
    ("local|strided&sparse", masks.Local(63) | (masks.Strided(8) & masks.Strided(8))),
    ("gqa+local&strided", masks.Local(63) & masks.Strided(8)),
])
def test_patterns_compose_as_masks_do(spelling, want):
    assert flags.model_config(attention=spelling).attention.masks == (want,)


def test_heads_preset_and_pattern_join_with_plus():
    c = flags.model_config(attention="gqa+local|global", num_heads=8, window=16)
    assert c.kv_heads == 4 and c.attention.masks[0] == masks.Local(15) | (
        (masks.Local(15) | masks.GlobalTokens((0,))) & masks.Causal())
    assert flags.model_config(attention="mqa").kv_heads == 1
    assert flags.model_config(attention="local+mqa").kv_heads == 1  # either order


@pytest.mark.parametrize("spelling, named", [
    ("gqa+local+sparse", ["'local'", "'sparse'", "local&sparse", "local|sparse"]),
    ("mqa+gqa", ["'mqa'", "'gqa'"]),
    ("local&", ["after an operator"]),
    ("(local|full", ["not closed"]),
    ("local&gqa", ["heads preset", "'gqa+local'"]),
    ("favor&local", ["Favor", "layer_pattern"]),
    ("nope", ["'nope'", "register_pattern"]),
    ("gqa++local", ["empty part"]),
])
def test_bad_spellings_are_refused_naming_the_parts(spelling, named):
    with pytest.raises(ValueError) as e:
        flags.ModelFlags(attention=spelling)
    message = str(e.value)
    assert "\n" not in message and message.startswith(f"attention={spelling!r}")
    for part in named:
        assert part in message


@pytest.mark.parametrize("changes, named", [
    (dict(attention="mqa", num_kv_heads=2), ["'mqa'", "num_kv_heads=2"]),
    (dict(attention="mha", num_kv_heads=2), ["'mha'", "num_kv_heads=2"]),
    (dict(attention="gqa", num_kv_heads=4), ["'gqa'", "num_kv_heads=4"]),
    (dict(attention="gqa", num_heads=2), ["num_kv_heads=1", "'mqa' or 'mha'"]),
    (dict(attention="local", layer_pattern="full,local"), ["'local'", "layer_pattern=full,local"]),
])
def test_a_preset_that_contradicts_a_field_is_refused(changes, named):
    with pytest.raises(ValueError) as e:
        flags.ModelFlags(**changes)
    for part in named:
        assert part in str(e.value)


def test_explicit_heads_without_a_preset_are_kept():
    assert flags.model_config(num_kv_heads=2).kv_heads == 2
    assert flags.model_config(attention="local", num_kv_heads=1).kv_heads == 1
    assert flags.model_config(attention="mqa", num_kv_heads=1).kv_heads == 1  # agrees


def test_tuple_fields_take_comma_lists():
    f = flags.ModelFlags(layer_pattern="local,local,local,favor", implementation="xla,cpu")
    assert f.layer_pattern == ("local", "local", "local", "favor")
    assert f.implementation == ("xla", "cpu")
    # ml_collections hands over an unquoted comma list as a one-element tuple
    assert flags.ModelFlags(layer_pattern=("local&strided,full",)).layer_pattern == (
        "local&strided", "full")


def _parse_cli(*args):
    """The config of configs/decoder_lm.py after ``args``, parsed as the scripts parse them."""
    values = absl_flags.FlagValues()
    argv = ["prog", f"--config={ROOT / 'configs' / 'decoder_lm.py'}", *args]
    config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                    sys_argv=argv)
    values(argv)
    return values.config


def test_command_line_comma_lists_and_operators():
    config = _parse_cli("--config.model.layer_pattern=local,local,local,favor",
                        "--config.model.implementation=xla,cpu",
                        "--config.model.attention=")
    f = configs.model_flags(config.model)
    assert f.layer_pattern == ("local", "local", "local", "favor")
    assert f.implementation == ("xla", "cpu")
    # the spelling that worked before keeps working
    old = _parse_cli("--config.model.layer_pattern=('local','favor')")
    assert configs.model_flags(old.model).layer_pattern == ("local", "favor")
    mixed = _parse_cli("--config.model.attention=gqa+(local|global)&strided")
    assert configs.model_config(mixed.model).kv_heads == 2
    # sweeping the heads of a config no longer collides with a preset it spelled
    assert configs.model_config(_parse_cli("--config.model.num_kv_heads=1").model).kv_heads == 1


# -- fields ------------------------------------------------------------------------------------
def test_every_field_has_a_one_line_doc_and_a_type():
    fields = flags.fields()
    assert {"window", "t5_buckets", "norm_eps", "pooler", "linear_features"} <= set(fields)
    for name, field in fields.items():
        assert field.doc and "\n" not in field.doc, name
        assert field.type is not None, name


def test_unknown_field_suggests_the_nearest():
    with pytest.raises(ValueError, match=r"num_kv_head: not a model flag; did you mean "
                                         r"num_kv_heads"):
        flags.ModelFlags(num_kv_head=2)


def test_a_registered_variant_brings_its_fields(monkeypatch):
    """A new pattern adds its field: settable from flags, listed, printed back."""
    def dilated(f, *, causal):
        return masks.Strided(f.dilation) & masks.Causal()

    def prints(m, causal):
        return (isinstance(m, masks.And) and type(m.a) is masks.Strided and
                m.b == masks.Causal() and {"dilation": m.a.stride})

    entries = dict(flags.PATTERNS._entries)
    monkeypatch.setattr(flags.PATTERNS, "_entries", entries)
    flags.register_pattern("dilated_test", dilated, prints=prints, fields=(
        Field("dilation", 2, "the test pattern's stride", check=positive_int),))
    assert "dilation" in flags.fields()
    assert "dilation" in configs.model_dict()
    c = flags.model_config(attention="dilated_test", dilation=3)
    assert c.attention.masks == (masks.Strided(3) & masks.Causal(),)
    assert flags.to_flags(c) == {"attention": "dilated_test", "dilation": 3}
    with pytest.raises(ValueError, match=r"dilation=0: must be a positive integer"):
        flags.ModelFlags(dilation=0)


# -- printing back -----------------------------------------------------------------------------
def test_to_flags_refuses_what_flags_cannot_spell():
    c = flags.model_config()
    with pytest.raises(ValueError, match="callable"):
        flags.to_flags(configs_replace(c, implementation=(lambda *a, **k: None,)))
    with pytest.raises(ValueError, match="no registered pattern|not spelled"):
        flags.to_flags(configs_replace(c, masks=(masks.Local(3, 1),)))


def configs_replace(c, **attention):
    from tx.config import replace
    return replace(c, attention=replace(c.attention, **attention))


def test_flag_args_round_trip_through_the_command_line():
    c = flags.model_config(layer_pattern="local&strided,favor", num_kv_heads=2, window=16,
                           positions="alibi")
    args = flags.flag_args(flags.to_flags(c))
    assert configs.model_config(_parse_cli(*args, "--config.model.d_model=64",
                                           "--config.model.d_ff=256",
                                           "--config.model.vocab_size=256",
                                           "--config.model.max_len=512").model) == c


_MASK_NAMES = ["full", "causal", "local", "strided", "sparse", "bigbird", "global"]


@st.composite
def _expr(draw, depth=0):
    if depth < 2 and draw(st.booleans()):
        a, b = draw(_expr(depth + 1)), draw(_expr(depth + 1))
        op = draw(st.sampled_from("&|"))
        return f"({a}){op}({b})" if draw(st.booleans()) else f"{a}{op}{b}"
    return draw(st.sampled_from(_MASK_NAMES))


@st.composite
def _flags(draw):
    num_heads = draw(st.sampled_from([1, 2, 4, 8]))
    kw = dict(num_heads=num_heads, d_model=8 * num_heads,
              task=draw(st.sampled_from(flags.tasks()[:5])),
              positions=draw(st.sampled_from(["rope", "sinusoidal", "learned", "t5", "alibi",
                                              "none"])),
              norm=draw(st.sampled_from(["rmsnorm", "layernorm"])),
              activation=draw(st.sampled_from(list(flags.ACTIVATIONS))),
              dtype=draw(st.sampled_from(["float32", "bfloat16", "float16"])),
              window=draw(st.integers(1, 64)), stride=draw(st.integers(1, 16)),
              sparse_block=draw(st.integers(1, 32)), pre_norm=draw(st.booleans()),
              attention_bias=draw(st.booleans()), mlp_bias=draw(st.booleans()),
              attention_sinks=draw(st.booleans()), head_bias=draw(st.booleans()),
              tie_embeddings=draw(st.booleans()), embed_norm=draw(st.booleans()),
              attention_softcap=draw(st.none() | st.floats(1.0, 100.0)),
              final_softcap=draw(st.none() | st.floats(1.0, 100.0)),
              num_classes=draw(st.integers(2, 5)), pooler=draw(st.sampled_from(["mean",
                                                                                "cls"])),
              t5_buckets=2 * draw(st.integers(2, 16)), linear_features=draw(st.integers(1, 64)),
              type_vocab_size=draw(st.integers(0, 3)), max_len=draw(st.integers(1, 1024)))
    kw["t5_max_distance"] = kw["t5_buckets"] // 2 + draw(st.integers(1, 100))
    kw["sandwich_norm"] = kw["pre_norm"] and draw(st.booleans())
    kw["norm_unit_offset"] = kw["norm"] == "rmsnorm" and draw(st.booleans())
    divisors = [k for k in range(1, num_heads + 1) if num_heads % k == 0]
    heads = draw(st.sampled_from([None, "preset"] + divisors))
    preset = None
    if heads == "preset":
        preset = draw(st.sampled_from(["mha", "mqa"] + (["gqa"] if num_heads >= 4 else [])))
    elif heads is not None:
        kw["num_kv_heads"] = heads
    layer = st.one_of(_expr(), st.sampled_from(["favor", "local_favor"]))
    longest = 1  # a schedule longer than its tower is refused: draw the layers to fit
    if draw(st.booleans()):
        kw["layer_pattern"] = tuple(draw(st.lists(layer, min_size=1, max_size=3)))
        kw["attention"] = preset or ""
        longest = len(kw["layer_pattern"])
    else:
        pattern = draw(st.none() | layer)
        kw["attention"] = "+".join(p for p in (preset, pattern) if p)
    kw["num_layers"] = draw(st.integers(longest, 4))
    if kw["task"] == "seq2seq":
        kw["num_decoder_layers"] = draw(st.none() | st.integers(longest, 4))
    return kw


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_flags())
def test_parse_of_to_flags_is_the_identity(kw):
    config = flags.model_config(**kw)
    printed = flags.to_flags(config)
    assert flags.model_config(**printed) == config
    assert flags.to_flags(flags.model_config(**printed)) == printed  # a fixed point


def test_a_schedule_longer_than_the_layers_is_refused_not_cut():
    """``layer_pattern=local,local,full`` on 2 layers would train ``local,local`` and drop
    ``full``: refused by name; as many entries as layers, or fewer (cycled), are fine."""
    with pytest.raises(ValueError, match=r"names 3 layers but the tower has 2.*raise num_layers"):
        flags.model_config(layer_pattern="local,local,full", num_layers=2)
    assert len(flags.model_config(layer_pattern="local,full", num_layers=2).attention.masks) == 2
    with pytest.raises(ValueError, match=r"head.masks.*raise num_decoder_layers"):
        flags.model_config(task="seq2seq", layer_pattern="local,full", num_layers=2,
                           num_decoder_layers=1)

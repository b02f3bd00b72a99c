import dataclasses

import pytest

import poisonbench
from poisonbench.config import resolve
from poisonbench.registry import RegistryError, build_params, param


def test_builtins_are_registered():
    assert {"badnet", "none"} <= set(poisonbench.list_attacks())
    assert {"clip", "roclip", "aug-only"} <= set(poisonbench.list_defenses())
    assert "fashion-mnist" in poisonbench.list_datasets()
    assert poisonbench.get_defense("roclip").name == "roclip"


def test_unknown_name_lists_valid_choices():
    with pytest.raises(RegistryError) as e:
        poisonbench.get_attack("badnett")
    assert "badnet" in str(e.value) and "none" in str(e.value)
    with pytest.raises(RegistryError, match="valid defenses: aug-only, cleanclip, clip, density-filter"):
        poisonbench.get_defense("nope")


def test_unknown_parameter_lists_valid_ones():
    with pytest.raises(RegistryError) as e:
        resolve("badnet", "clip", "tiny", attack_params={"patchsize": "3"})
    msg = str(e.value)
    assert "patchsize" in msg and "patch_size" in msg and "location" in msg


def test_command_line_strings_are_converted_to_field_types():
    cfg = resolve("badnet", "roclip", "tiny", attack_params={"patch_size": "3", "poison_rate": "0.01"},
                  defense_params={"augment": "false", "pool_size": "64"})
    assert cfg.attack_params["patch_size"] == 3
    assert cfg.attack_params["poison_rate"] == 0.01
    assert cfg.defense_params["augment"] is False and cfg.defense_params["pool_size"] == 64
    with pytest.raises(RegistryError, match="patch_size"):
        resolve("badnet", "clip", "tiny", attack_params={"patch_size": "big"})


def test_profile_defaults_and_overrides_change_the_run_id():
    a = resolve("badnet", "roclip", "tiny")
    assert a.defense_params["pool_size"] == 256  # the tiny profile's default
    b = resolve("badnet", "roclip", "tiny", defense_params={"pool_size": 128})
    assert a.run_id != b.run_id and a.run_id == resolve("badnet", "roclip", "tiny").run_id
    with pytest.raises(ValueError, match="valid profiles"):
        resolve("badnet", "clip", "laptop")


def test_profile_attack_defaults_apply_only_to_their_attack_and_yield_to_explicit_values():
    assert resolve("targeted", "clip", "cpu-small").attack_params["pairs_per_target"] == 10
    explicit = resolve("targeted", "clip", "cpu-small", attack_params={"pairs_per_target": "3"})
    assert explicit.attack_params["pairs_per_target"] == 3
    assert "pairs_per_target" not in resolve("badnet", "clip", "cpu-small").attack_params


def test_duplicate_registration_is_refused():
    reg = poisonbench.registry.Registry("thing", "poisonbench.attacks", "poisonbench.things")

    @dataclasses.dataclass
    class P:
        x: int = param(1, "x")

    class A:
        Params = P

    class B:
        Params = P

    reg.register("a")(A)
    with pytest.raises(RegistryError, match="already registered"):
        reg.register("a")(B)
    with pytest.raises(RegistryError, match="needs a dataclass"):
        reg.register("c")(type("C", (), {}))
    assert build_params(P, {"x": "7"}, "t").x == 7


@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan")])
def test_non_finite_float_parameters_are_refused(value):
    with pytest.raises(RegistryError, match="finite"):
        resolve("wanet", "clip", "tiny", attack_params={"strength": value})


# --- enum-like parameters, and when a run id changes ------------------------------------------

# Run ids of reference cells on main before Literal parameters, world_size and hash_default existed:
# none of those may re-key an existing cell.
REFERENCE_IDS = {("badnet", "clip", "tiny", 0): "477ce5b67d0c22cf", ("badnet", "clip", "cpu-small", 0): "a4f540880d13a031",
                 ("targeted", "roclip", "cpu-small", 1): "b4bbf6f831b7d350"}


def test_run_ids_of_existing_cells_are_unchanged():
    for (attack, defense, profile, seed), run_id in REFERENCE_IDS.items():
        assert resolve(attack, defense, profile, seed).run_id == run_id
    files = resolve("badnet", "roclip", "tiny", 0, {"location": "random"}, {"pool_update": "always"},
                    {"train": "csv:/x.csv", "load": "lazy"}, "files")  # all three Literal parameters
    assert files.run_id == "8e664d48e2f177de"


def test_literal_annotation_leaves_asdict_as_with_str():
    import typing

    @dataclasses.dataclass
    class AsStr:
        where: str = param("left", "w")

    @dataclasses.dataclass
    class AsLiteral:
        where: typing.Literal["left", "right"] = param("left", "w")

    as_str, as_literal = build_params(AsStr, {"where": "right"}, "t"), build_params(AsLiteral, {"where": "right"}, "t")
    assert dataclasses.asdict(as_str) == dataclasses.asdict(as_literal) == {"where": "right"}
    assert type(as_literal.where) is str


@pytest.mark.parametrize("kind, name, key, choices", [
    ("attack", "badnet", "location", "random, top-left, top-right, bottom-left, bottom-right"),
    ("attack", "badnet-lc", "location", "random, top-left, top-right, bottom-left, bottom-right"),
    ("defense", "roclip", "pool_update", "matching, always"),
    ("dataset", "files", "load", "auto, memory, lazy"),
])
def test_enum_like_parameters_are_checked_by_the_registry_and_listed(kind, name, key, choices, monkeypatch):
    from click.testing import CliRunner

    from poisonbench.cli import main
    from poisonbench.display import console
    from poisonbench.registry import ATTACKS, DATASETS, DEFENSES, param_fields

    registry = {"attack": ATTACKS, "defense": DEFENSES, "dataset": DATASETS}[kind]
    with pytest.raises(RegistryError, match=f"bad value 'middle' for {key}: choose one of {choices}"):
        registry.params(name, {key: "middle"})
    assert {f[0]: f[1] for f in param_fields(registry.get(name).Params)}[key] == "{" + choices + "}"
    monkeypatch.setattr(console, "width", 400)  # one line per parameter
    listed = CliRunner().invoke(main, ["list", kind + "s"])
    assert "{" + choices + "}" in listed.output
    if kind != "dataset":  # `bench status` refuses it, before any data is read or any plugin is built
        flag = {"attack": "-A", "defense": "-D"}[kind]
        out = CliRunner().invoke(main, ["status", "-p", "tiny", "-a" if kind == "attack" else "-d", name,
                                        flag, f"{key}=middle", "-r", "unused"])
        assert out.exit_code == 2 and f"bad value 'middle' for {key}: choose one of {choices}" in out.output


def test_a_literal_default_outside_its_choices_is_refused_at_registration():
    import typing

    @dataclasses.dataclass
    class P:
        where: typing.Literal["left", "right"] = param("middle", "w")

    reg = poisonbench.registry.Registry("thing", "poisonbench.attacks", "poisonbench.things")
    with pytest.raises(RegistryError, match="default 'middle' of where is not valid: choose one of left, right"):
        reg.register("p")(type("T", (), {"Params": P}))


def test_a_parameter_added_with_hash_default_false_keeps_the_run_ids(monkeypatch):
    """A plugin that gains a parameter declared hash_default=False keeps the run ids of its cells
    (and so their finished results) while the parameter is at its default; a plain new parameter
    re-keys them all."""
    from poisonbench.attacks.badnet import BadNet, BadNetParams
    from poisonbench.config import RunConfig, setting_id
    from poisonbench.registry import ATTACKS

    before = resolve("badnet", "clip", "tiny")

    def gain(hash_default):
        @dataclasses.dataclass
        class Grown(BadNetParams):
            opacity: float = param(1.0, "how opaque the patch is", hash_default=hash_default)

        monkeypatch.setitem(ATTACKS._items, "badnet", type("GrownBadNet", (BadNet,), {"Params": Grown}))

    gain(hash_default=False)
    after = resolve("badnet", "clip", "tiny")
    assert after.attack_params["opacity"] == 1.0  # the cell has it ...
    assert after.run_id == before.run_id  # ... and its id is unchanged
    assert "opacity" not in after.to_dict()["attack_params"]
    assert RunConfig(**after.to_dict()).run_id == after.run_id  # `bench cell` rebuilds the same cell
    assert setting_id(after.to_dict()) == setting_id(before.to_dict())  # and the report pools old and new rows
    changed = resolve("badnet", "clip", "tiny", attack_params={"opacity": "0.5"})
    assert changed.run_id != before.run_id and changed.to_dict()["attack_params"]["opacity"] == 0.5

    gain(hash_default=True)  # today's rule without it: every cell of the plugin is re-keyed
    assert resolve("badnet", "clip", "tiny").run_id != before.run_id


def test_a_parameter_without_a_default_is_refused_at_registration():
    """Accepted, it broke `bench list` (param_fields) for everyone; refused, a third-party plugin
    with it is a broken plugin (tests/test_broken_plugin.py)."""
    @dataclasses.dataclass
    class P:
        target: str = dataclasses.field(metadata={"help": "t"})
        size: int = param(3, "s")

    reg = poisonbench.registry.Registry("thing", "poisonbench.attacks", "poisonbench.things")
    with pytest.raises(RegistryError, match="thing 'p': parameter target has no default"):
        reg.register("p")(type("T", (), {"Params": P}))
    assert "p" not in reg._items

    @dataclasses.dataclass
    class Q:
        sizes: list = dataclasses.field(default_factory=lambda: [1, 2])  # a default factory is a default

    reg.register("q")(type("U", (), {"Params": Q}))


def test_literal_choices_that_are_not_strings_can_be_given_on_the_command_line():
    import typing

    @dataclasses.dataclass
    class P:
        k: typing.Literal[3, 4, 5] = param(3, "k")
        mode: typing.Optional[typing.Literal["a", 2]] = param(None, "m")

    assert build_params(P, {"k": "4"}, "t").k == 4 and type(build_params(P, {"k": "4"}, "t").k) is int
    assert build_params(P, {"k": 5}, "t").k == 5  # a profile's or stored config's value
    assert build_params(P, {"mode": "2"}, "t").mode == 2 and build_params(P, {"mode": "a"}, "t").mode == "a"
    assert build_params(P, {"mode": "none"}, "t").mode is None
    with pytest.raises(RegistryError, match="bad value '6' for k: choose one of 3, 4, 5"):
        build_params(P, {"k": "6"}, "t")
    with pytest.raises(RegistryError, match="choose one of 3, 4, 5"):
        build_params(P, {"k": "4.0"}, "t")

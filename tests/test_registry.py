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
    with pytest.raises(RegistryError, match="valid defenses: aug-only, clip, roclip"):
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

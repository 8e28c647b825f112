"""Hand-computed checks for copd.core.merge."""

import pytest
import torch

from copd.core.merge import Merger, merge_state_dicts


def _two():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([3.0]), "steps": torch.tensor([7])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([5.0]), "steps": torch.tensor([9])}
    return a, b


def test_mean_and_int_buffers():
    a, b = _two()
    out = merge_state_dicts([a, b])
    # (1+3)/2, (2+6)/2 -> [2, 4]; (3+5)/2 -> 4; int buffer copied from the first dict.
    torch.testing.assert_close(out["w"], torch.tensor([2.0, 4.0]))
    torch.testing.assert_close(out["b"], torch.tensor([4.0]))
    assert torch.equal(out["steps"], torch.tensor([7]))
    assert out["w"] is not a["w"]


def test_weighted_normalises():
    a, b = _two()
    # weights [1,3] -> [0.25, 0.75]: w = 0.25*[1,2] + 0.75*[3,6] = [2.5, 5.0];
    # b = 0.25*3 + 0.75*5 = 4.5.
    out = merge_state_dicts([a, b], "weighted", weights=[1.0, 3.0])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    torch.testing.assert_close(out["b"], torch.tensor([4.5]))


@pytest.mark.parametrize("weights", [None, [1.0], [0.0, 0.0], [1.0, -2.0]])
def test_weighted_bad_weights(weights):
    a, b = _two()
    with pytest.raises(ValueError, match="weighted"):
        merge_state_dicts([a, b], "weighted", weights=weights)


def test_task_arithmetic():
    base = {"w": torch.tensor([1.0, 1.0])}
    t1, t2 = {"w": torch.tensor([2.0, 1.0])}, {"w": torch.tensor([1.0, 3.0])}
    # Defaults (w = 1/2 each, scale 1) reduce to the mean: [1.5, 2.0].
    out = merge_state_dicts([t1, t2], "task_arithmetic", base=base)
    torch.testing.assert_close(out["w"], torch.tensor([1.5, 2.0]))
    # taus [1,0], [0,2]; weights [1,1], scale 2: base + 2*[1,2] = [3, 5].
    out = merge_state_dicts([t1, t2], "task_arithmetic", weights=[1, 1], base=base, scale=2.0)
    torch.testing.assert_close(out["w"], torch.tensor([3.0, 5.0]))


def _ties_inputs(base_value: float):
    base = torch.full((6,), base_value)
    tau1 = torch.tensor([4.0, -1.0, 0.5, -3.0, 0.0, 2.0])
    tau2 = torch.tensor([-2.0, 2.0, 0.5, 3.5, 1.0, 2.5])
    return {"w": base}, [{"w": base + tau1}, {"w": base + tau2}]


def test_ties_by_hand():
    # density 0.5 of 6 entries -> keep 3 per task vector.
    # tau1 |.| = [4,1,.5,3,0,2] -> keep idx 0,3,5 -> [4,0,0,-3,0,2]
    # tau2 |.| = [2,2,.5,3.5,1,2.5] -> 3.5 (idx3), 2.5 (idx5), then a tie of 2 at idx 0 and 1:
    #   the lower index wins -> keep idx 0 -> [-2,0,0,3.5,0,2.5]
    # elected sign of sum [2,0,0,0.5,0,4.5] -> [+,0,0,+,0,+]
    # disjoint mean: idx0 {4} -> 4; idx3 {3.5} -> 3.5; idx5 {2,2.5} -> 2.25; others 0.
    base, thetas = _ties_inputs(1.0)
    out = merge_state_dicts(thetas, "ties", base=base, density=0.5)
    torch.testing.assert_close(out["w"], 1.0 + torch.tensor([4.0, 0.0, 0.0, 3.5, 0.0, 2.25]))
    out = merge_state_dicts(thetas, "ties", base=base, density=0.5, scale=0.5)
    torch.testing.assert_close(out["w"], 1.0 + torch.tensor([2.0, 0.0, 0.0, 1.75, 0.0, 1.125]))


def test_ties_trims_per_tensor_flattened():
    # Same numbers as a 2x3 matrix: trimming works on the flattened tensor.
    base, thetas = _ties_inputs(0.0)
    flat = merge_state_dicts(thetas, "ties", base=base, density=0.5)["w"]
    thetas_2d = [{"w": t["w"].reshape(2, 3)} for t in thetas]
    base_2d = {"w": base["w"].reshape(2, 3)}
    shaped = merge_state_dicts(thetas_2d, "ties", base=base_2d, density=0.5)["w"]
    torch.testing.assert_close(shaped, flat.reshape(2, 3))


def test_low_precision_computed_in_float32_and_cast_back():
    # Mean of bf16 [256, 1, 1]: in float32 (256+1+1)/3 = 86, exact in bf16. Summing in bf16
    # would lose both 1s (257 rounds to 256, spacing 2 there) and give 256/3 -> 85.5.
    sds = [{"w": torch.tensor([v], dtype=torch.bfloat16)} for v in (256.0, 1.0, 1.0)]
    out = merge_state_dicts(sds)
    assert out["w"].dtype == torch.bfloat16
    assert out["w"].float().item() == 86.0


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_missing_base(method):
    a, b = _two()
    with pytest.raises(ValueError, match=method):
        merge_state_dicts([a, b], method)


def test_mismatched_keys_and_shapes():
    a, b = _two()
    with pytest.raises(ValueError, match="steps"):
        merge_state_dicts([a, {k: v for k, v in b.items() if k != "steps"}])
    with pytest.raises(ValueError, match="'w'"):
        merge_state_dicts([a, {**b, "w": torch.zeros(3)}])
    with pytest.raises(ValueError, match="base"):
        merge_state_dicts([a, b], "ties", base={"w": torch.zeros(2)})


def test_unknown_method_options_and_stray_weights():
    a, b = _two()
    with pytest.raises(ValueError, match="slerp"):
        merge_state_dicts([a, b], "slerp")
    with pytest.raises(ValueError, match="density"):
        merge_state_dicts([a, b], "task_arithmetic", base=a, density=0.3)
    with pytest.raises(ValueError, match="weighted"):
        merge_state_dicts([a, b], "mean", weights=[0.5, 0.5])
    with pytest.raises(ValueError, match="density"):
        merge_state_dicts([a, b], "ties", base=a, density=0.0)
    with pytest.raises(ValueError, match="at least one"):
        merge_state_dicts([], "mean")


def _random_dicts(k: int):
    generator = torch.Generator().manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=generator)  # noqa: E731
    dicts = [{"w": draw(4, 6), "h": draw(7).to(torch.bfloat16), "steps": torch.tensor([i])} for i in range(k)]
    return dicts, {"w": draw(4, 6), "h": draw(7).to(torch.bfloat16), "steps": torch.tensor([9])}


@pytest.mark.parametrize("method, weights, options", [
    ("mean", None, {}), ("weighted", [1.0, 2.0, 0.5], {}), ("task_arithmetic", [0.2, 0.5, 0.3], {"scale": 0.7}),
    ("ties", None, {"density": 0.4, "scale": 1.5}),
])
def test_merger_merges_one_key_at_a_time_as_merge_state_dicts_does(method, weights, options):
    dicts, base = _random_dicts(3)
    whole = merge_state_dicts(dicts, method, weights=weights, base=base, **options)
    merger = Merger.create(method, 3, weights, has_base=True, **options)
    for key in dicts[0]:
        # Values drawn one at a time from a generator, as a merge streaming from disk gives them.
        one = merger.merge_tensor((d[key] for d in dicts), base[key])
        assert one.dtype == whole[key].dtype and torch.equal(one, whole[key]), key
    for key, value in merger.merge_state_dicts(dicts, base).items():
        assert torch.equal(value, whole[key])


def test_merger_checks_once_and_counts_values():
    with pytest.raises(ValueError, match="slerp"):
        Merger.create("slerp", 2)
    with pytest.raises(ValueError, match="needs base"):
        Merger.create("ties", 2)
    with pytest.raises(ValueError, match="got 1 weights for 2"):
        Merger.create("weighted", 2, [1.0])
    with pytest.raises(ValueError, match="density"):
        Merger.create("ties", 2, has_base=True, density=1.5)
    merger = Merger.create("mean", 2)
    with pytest.raises(ValueError, match="got 1 values for 2"):
        merger.merge_tensor([torch.ones(2)])
    with pytest.raises(ValueError, match="more than 2 values"):
        merger.merge_tensor([torch.ones(2)] * 3)
    with pytest.raises(ValueError, match="needs base"):
        Merger.create("ties", 2, has_base=True).merge_tensor([torch.ones(2)] * 2)
    # An integer buffer is the first value: the others are not even drawn.
    drawn = []
    values = (drawn.append(i) or torch.tensor([i]) for i in (5, 6))
    assert torch.equal(merger.merge_tensor(values), torch.tensor([5])) and drawn == [5]

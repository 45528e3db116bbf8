"""experiments/benchmarks/layer_loop.py compares three ways of looping over a stack of layers: they must
compute the same function (else the timings compare different work), and it must print its JSON line."""
import json

import jax
import numpy as np

from experiments.benchmarks import layer_loop


def test_the_three_layer_loops_compute_the_same_output_and_gradient():
    layers, width, inner = 3, 8, 16
    key = jax.random.PRNGKey(0)
    w1 = 0.3 * jax.random.normal(key, (layers, width, inner))
    w2 = 0.3 * jax.random.normal(jax.random.fold_in(key, 1), (layers, inner, width))
    adapters = 0.1 * jax.random.normal(jax.random.fold_in(key, 2), (layers, width, 8))
    x = jax.random.normal(jax.random.fold_in(key, 3), (5, width))
    separate = ([w1[i] for i in range(layers)], [w2[i] for i in range(layers)])
    outputs, gradients = [], []
    for name, loop in layer_loop.loops(layers).items():
        weights = separate if name == "loop over separate arrays" else (w1, w2)
        outputs.append(np.asarray(loop(adapters, x, *weights)))
        gradients.append(np.asarray(jax.grad(lambda a: (loop(a, x, *weights) ** 2).sum())(adapters)))
    for output, gradient in zip(outputs[1:], gradients[1:]):
        np.testing.assert_allclose(output, outputs[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(gradient, gradients[0], rtol=1e-4, atol=1e-5)


def test_layer_loop_prints_one_json_line_with_every_loop(capsys):
    layer_loop.main(["--layers", "2", "--width", "8", "--inner", "16", "--rows", "4", "--repeats", "1"])
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (case,) = table.values()
    assert set(case) == set(layer_loop.loops(2)) and all(value > 0 for value in case.values())

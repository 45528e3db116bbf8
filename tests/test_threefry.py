"""The unrolled CPU lowering of threefry2x32 (jaxtree_lora.threefry) gives JAX's bits.

If these fail, every dropout mask, alignment sample and shuffle of a run would change with the
lowering (and resumed or repeated runs would disagree with older ones)."""
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from jaxtree_lora import threefry


def test_known_answers_of_the_specification():
    """Threefry-2x32, 20 rounds: the Random123 known-answer vectors (key, counter) -> output."""
    cases = [((0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
             ((0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
             ((0x13198A2E, 0x03707344), (0x243F6A88, 0x85A308D3), (0xC4923A9C, 0x483DF7A0))]
    for key, counter, expected in cases:
        key = jnp.asarray(np.array(key, np.uint32))
        out = jax.jit(threefry_2x32)(key, jnp.asarray(np.array(counter, np.uint32)))
        assert [int(v) for v in out] == list(expected)
        direct = threefry.threefry2x32(*(jnp.uint32(v) for v in (*key.tolist(), *counter)))
        assert [int(v) for v in direct] == list(expected)


DRAWS = """
import jax, jax.numpy as jnp, numpy as np
{imports}
draw = jax.jit(lambda key: [jax.random.normal(key, (3, 5, 7)),
                             jax.random.bernoulli(jax.random.fold_in(key, 1), 0.9, (4, 33)),
                             jax.random.permutation(jax.random.fold_in(key, 2), 50), jax.random.split(key, 3),
                             jax.random.bits(key, (9,), jnp.uint16)])
print(";".join(np.asarray(d).tobytes().hex() for d in draw(jax.random.PRNGKey(7))))
"""


def test_draws_equal_jax_own_lowering():
    """Normal, Bernoulli, permutation, split and 16-bit draws under jit: identical bytes with JAX's
    rolled-loop lowering (a process without this module) and with ours."""
    outputs = []
    for imports in ("", "import jaxtree_lora.threefry"):
        result = subprocess.run([sys.executable, "-c", DRAWS.format(imports=imports)], capture_output=True,
                                text=True, check=True, env={"JAX_PLATFORMS": "cpu", "PATH": ""})
        outputs.append(result.stdout.strip())
    assert outputs[0] and outputs[0] == outputs[1]

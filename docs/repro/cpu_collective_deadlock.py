"""XLA:CPU deadlock: collectives on several devices of one process, host dispatching far ahead.

  python docs/repro/cpu_collective_deadlock.py            # aborts within seconds on 2 cores
  python docs/repro/cpu_collective_deadlock.py --lag=4    # waits for step i-4: completes
  PJRT_NPROC=16 python docs/repro/cpu_collective_deadlock.py   # bigger pool: completes

JAX and NumPy only. See docs/cpu_collective_deadlock.md.
"""

import argparse
import collections
import os

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

parser = argparse.ArgumentParser()
parser.add_argument("--steps", type=int, default=3000)
parser.add_argument("--lag", type=int, default=0, help="wait for step i-lag (0: never wait)")
args = parser.parse_args()

mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "fsdp"))
weights_sharding = NamedSharding(mesh, P("fsdp", None))  # all-gathered in the step
batch_sharding = NamedSharding(mesh, P(("data", "fsdp"), None))


def step(weights, x):
  def loss(weights):
    h = x
    for w in weights:
      h = jnp.tanh(h @ w)
    return jnp.mean(h**2)  # all-reduce

  value, grads = jax.value_and_grad(loss)(weights)
  return [w - 0.1 * g for w, g in zip(weights, grads, strict=True)], value


step = jax.jit(
  step,
  in_shardings=(weights_sharding, batch_sharding),
  out_shardings=(weights_sharding, NamedSharding(mesh, P())),
  donate_argnums=(0,),
)
weights = [jax.device_put(jnp.full((64, 64), 0.01), weights_sharding) for _ in range(4)]
x = jax.device_put(jnp.ones((128, 64)), batch_sharding)
in_flight = collections.deque()
for i in range(args.steps):
  weights, value = step(weights, x)
  in_flight.append(value)
  if args.lag and len(in_flight) > args.lag:
    jax.block_until_ready(in_flight.popleft())
  if i % 500 == 0:
    print(f"step {i}: loss {float(value):.3g}", flush=True)
jax.block_until_ready(weights)
print("done", flush=True)

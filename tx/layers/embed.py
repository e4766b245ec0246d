"""Token embedding, with a tied output projection (`attend`)."""
import jax
import jax.numpy as jnp
from flax import nnx

from tx import parallel


class Embed(nnx.Module):
    """Lookup table `[V, D]`; `attend` reuses it as the output projection.

    Init is normal with stddev `1/sqrt(D)` (unit stddev, scaled by fan-out): each token
    vector then has norm ~1, and tied logits from a unit-variance hidden state start
    with unit variance, so softmax is not saturated at step 0. Models that want the
    Vaswani et al. convention multiply the looked-up vectors by `sqrt(D)` themselves.
    """

    def __init__(self, vocab_size: int, d_model: int, *, dtype=jnp.float32,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        # eager_sharding=False: the names are logical ('vocab' is not a mesh axis); they are
        # mapped to a mesh later through nnx.get_partition_spec and axis rules.
        init = nnx.with_partitioning(nnx.initializers.normal(stddev=d_model ** -0.5),
                                     ('vocab', 'embed'), eager_sharding=False)
        self.table_vd = nnx.Param(init(rngs.params(), (vocab_size, d_model), param_dtype))
        self.vocab_size = vocab_size
        self.d_model = d_model
        self.dtype = dtype

    def __call__(self, ids_bt: jax.Array) -> jax.Array:
        """`[B, T]` int ids -> `[B, T, D]` in `dtype`. Out-of-range ids give NaN (jnp.take fill)."""
        # Under a mesh, gather the fsdp-split columns first (FSDP's all-gather before use) so
        # the looked-up rows come out split by batch rather than by the table's layout.
        table_vd = parallel.constrain(self.table_vd[...], ('vocab', None))
        x_btd = jnp.take(table_vd, ids_bt, axis=0).astype(self.dtype)
        return parallel.constrain(x_btd, ('batch', None, 'embed'))

    def attend(self, x_btd: jax.Array) -> jax.Array:
        """`[B, T, D]` -> `[B, T, V]` float32 logits; matmul in `dtype`, accumulated in fp32."""
        table_vd = self.table_vd[...].astype(self.dtype)
        # One 2-D dot over the rows [B*T, D]: XLA's CPU backward of the 3-D form transposes
        # the activations before the table's gradient (1.5x slower); the reshapes are free.
        x_md = x_btd.reshape(-1, x_btd.shape[-1]).astype(self.dtype)
        logits_mv = jnp.einsum('MD,VD->MV', x_md, table_vd, preferred_element_type=jnp.float32)
        return logits_mv.reshape(*x_btd.shape[:-1], -1)

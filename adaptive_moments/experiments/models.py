"""flax.nnx models of the experiments, and their parameters' creation order.

Every model creates its sub-modules in forward order, so :func:`creation_order`
(attribute assignment order, which Python dicts keep) is the forward order and
also the Keras ``trainable_variables`` order the CaAdam reference saw: kernel
before bias, BatchNorm scale before bias. That order is what
``am.layer_table(params, order=...)`` needs for depth and for the
``"reference"`` structure.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# Keras defaults, which the CaAdam notebooks used: glorot_uniform kernels and
# zero biases for Dense / 1x1 Conv, he_normal for the ResNet's 3x3 convs.
_GLOROT = jax.nn.initializers.glorot_uniform()
_HE = jax.nn.initializers.he_normal()


def creation_order(model: nnx.Module) -> list[str]:
    """``/``-joined paths of the model's ``nnx.Param`` leaves in creation order.

    Walks the module graph in attribute assignment order (not the sorted order
    of ``nnx.state``); a shared parameter is listed once, at its first use.
    Call it on the model as constructed: a module rebuilt by ``nnx.merge`` or
    ``nnx.eval_shape`` has its attributes in sorted order.

    Example:
      >>> from flax import nnx
      >>> class Net(nnx.Module):
      ...   def __init__(self, rngs):
      ...     self.z = nnx.Linear(2, 3, rngs=rngs)
      ...     self.a = nnx.Linear(3, 1, rngs=rngs)
      >>> creation_order(Net(nnx.Rngs(0)))
      ['z/kernel', 'z/bias', 'a/kernel', 'a/bias']
    """
    out: list[str] = []
    seen: set[int] = set()

    def visit(obj: Any, prefix: tuple[str, ...]) -> None:
        if id(obj) in seen:
            return
        if isinstance(obj, nnx.Variable):
            seen.add(id(obj))
            if isinstance(obj, nnx.Param):
                out.append("/".join(prefix))
            return
        if isinstance(obj, nnx.Module):
            seen.add(id(obj))
            for key, value in vars(obj).items():
                if not key.startswith("_"):
                    visit(value, (*prefix, key))
        elif isinstance(obj, (list, tuple)):
            for i, value in enumerate(obj):
                visit(value, (*prefix, str(i)))

    visit(model, ())
    return out


class SmallCNN(nnx.Module):
    """Two conv+pool stages and a dense head (a small Fashion-MNIST CNN).

    Args:
      c1, c2: channels of the two 3x3 convolutions.
      dense: width of the hidden dense layer.
      in_channels: image channels.
      image_size: image height = width (divisible by 4).
      num_classes: number of classes.
      rngs: ``nnx.Rngs`` for the initial weights.
    """

    def __init__(
        self,
        c1: int,
        c2: int,
        dense: int,
        *,
        in_channels: int = 1,
        image_size: int = 28,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        self.conv1 = nnx.Conv(in_channels, c1, (3, 3), kernel_init=_GLOROT, rngs=rngs)
        self.conv2 = nnx.Conv(c1, c2, (3, 3), kernel_init=_GLOROT, rngs=rngs)
        flat = c2 * (image_size // 4) ** 2
        self.fc1 = nnx.Linear(flat, dense, kernel_init=_GLOROT, rngs=rngs)
        self.fc2 = nnx.Linear(dense, num_classes, kernel_init=_GLOROT, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        x = nnx.max_pool(jax.nn.relu(self.conv1(x)), (2, 2), (2, 2))
        x = nnx.max_pool(jax.nn.relu(self.conv2(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc2(jax.nn.relu(self.fc1(x)))


class ResidualBlock(nnx.Module):
    """ResNet v1 basic block: conv-BN-ReLU-conv-BN plus (projected) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, *, rngs: nnx.Rngs):
        # Keras BatchNormalization defaults: momentum 0.99, epsilon 1e-3.
        bn = dict(momentum=0.99, epsilon=1e-3, rngs=rngs)
        self.conv1 = nnx.Conv(cin, cout, (3, 3), stride, kernel_init=_HE, rngs=rngs)
        self.bn1 = nnx.BatchNorm(cout, **bn)
        self.conv2 = nnx.Conv(cout, cout, (3, 3), kernel_init=_HE, rngs=rngs)
        self.bn2 = nnx.BatchNorm(cout, **bn)
        if stride != 1 or cin != cout:
            self.proj = nnx.Conv(cin, cout, (1, 1), stride, kernel_init=_GLOROT, rngs=rngs)
            self.proj_bn = nnx.BatchNorm(cout, **bn)
        else:
            self.proj = None
            self.proj_bn = None

    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        y = jax.nn.relu(self.bn1(self.conv1(x), use_running_average=not train))
        y = self.bn2(self.conv2(y), use_running_average=not train)
        if self.proj is not None and self.proj_bn is not None:
            x = self.proj_bn(self.proj(x), use_running_average=not train)
        return jax.nn.relu(x + y)

    def l2_kernels(self) -> list[jax.Array]:
        return [self.conv1.kernel[...], self.conv2.kernel[...]]


class ResNet(nnx.Module):
    """CIFAR-style ResNet ``6n+2`` (ResNet-20 for n=3), as in the CaAdam paper.

    Stem conv3x3 -> BN -> ReLU; three stages of ``n`` basic blocks with
    ``width``, ``2 width``, ``4 width`` filters (stride 2 and a 1x1 conv + BN
    projection at the start of stages 2 and 3); global average pooling ->
    dense. 3x3 convs use he_normal and an L2(1e-4) penalty (see
    :meth:`l2_penalty`); all convs have a bias.
    """

    def __init__(
        self,
        n: int = 3,
        width: int = 16,
        *,
        in_channels: int = 3,
        num_classes: int = 10,
        rngs: nnx.Rngs,
    ):
        self.stem = nnx.Conv(in_channels, width, (3, 3), kernel_init=_HE, rngs=rngs)
        self.stem_bn = nnx.BatchNorm(width, momentum=0.99, epsilon=1e-3, rngs=rngs)
        blocks = []
        cin = width
        for stage, cout in enumerate((width, 2 * width, 4 * width)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(ResidualBlock(cin, cout, stride, rngs=rngs))
                cin = cout
        self.blocks = nnx.List(blocks)
        self.head = nnx.Linear(cin, num_classes, kernel_init=_GLOROT, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        x = jax.nn.relu(self.stem_bn(self.stem(x), use_running_average=not train))
        for block in self.blocks:
            x = block(x, train=train)
        return self.head(jnp.mean(x, axis=(1, 2)))

    def l2_penalty(self) -> jax.Array:
        """Sum of squares of the 3x3 conv kernels (Keras ``L2`` regularizer)."""
        kernels = [self.stem.kernel[...]]
        for block in self.blocks:
            kernels.extend(block.l2_kernels())
        return sum(jnp.sum(jnp.square(k)) for k in kernels)


class Head(nnx.Module):
    """Causal multi-head self-attention (q, k, v without bias; output proj)."""

    def __init__(self, d: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.heads = heads
        self.dropout = dropout
        self.query = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.key = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.value = nnx.Linear(d, d, use_bias=False, rngs=rngs)
        self.proj = nnx.Linear(d, d, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        h = self.heads

        def split(y: jax.Array) -> jax.Array:
            return y.reshape(b, t, h, d // h).transpose(0, 2, 1, 3)

        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        att = (q @ k.transpose(0, 1, 3, 2)) * jnp.asarray((d // h) ** -0.5, x.dtype)
        causal = jnp.tril(jnp.ones((t, t), dtype=bool))
        att = jax.nn.softmax(jnp.where(causal, att, jnp.asarray(-jnp.inf, att.dtype)), axis=-1)
        att = _dropout(att, self.dropout, key, 0)
        y = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, d)
        return _dropout(self.proj(y), self.dropout, key, 1)


def _dropout(x: jax.Array, rate: float, key: jax.Array | None, salt: int) -> jax.Array:
    # Explicit-key dropout: the train step passes one key per step, so runs are
    # reproducible and the same for every optimizer.
    if key is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(jax.random.fold_in(key, salt), 1.0 - rate, x.shape)
    return jnp.where(keep, x / jnp.asarray(1.0 - rate, x.dtype), jnp.zeros_like(x))


class Block(nnx.Module):
    """Pre-LN transformer block: x + attn(ln(x)); x + ffn(ln(x)), FFN 4x ReLU."""

    def __init__(self, d: int, heads: int, dropout: float, *, rngs: nnx.Rngs):
        self.dropout = dropout
        self.ln1 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
        self.attn = Head(d, heads, dropout, rngs=rngs)
        self.ln2 = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
        self.fc1 = nnx.Linear(d, 4 * d, rngs=rngs)
        self.fc2 = nnx.Linear(4 * d, d, rngs=rngs)

    def __call__(self, x: jax.Array, key: jax.Array | None) -> jax.Array:
        k1 = None if key is None else jax.random.fold_in(key, 1)
        k2 = None if key is None else jax.random.fold_in(key, 2)
        x = x + self.attn(self.ln1(x), k1)
        return x + _dropout(self.fc2(jax.nn.relu(self.fc1(self.ln2(x)))), self.dropout, k2, 0)


class CharGPT(nnx.Module):
    """Character-level GPT as in the EXAdam MinGPT notebook, at any size.

    Token + learned position embeddings, ``layers`` pre-LN blocks, final
    LayerNorm, linear LM head. The notebook's model is layers=8, d=384,
    heads=8, block=256, dropout=0.2.
    """

    def __init__(
        self,
        vocab: int,
        *,
        layers: int = 4,
        d: int = 128,
        heads: int = 4,
        block: int = 128,
        dropout: float = 0.0,
        rngs: nnx.Rngs,
    ):
        if d % heads:
            raise ValueError(f"d={d} must be divisible by heads={heads}.")
        self.dropout = dropout
        self.block = block  # the longest context; the task's loss reads it
        self.tok = nnx.Embed(vocab, d, rngs=rngs)
        self.pos = nnx.Embed(block, d, rngs=rngs)
        self.blocks = nnx.List([Block(d, heads, dropout, rngs=rngs) for _ in range(layers)])
        self.ln_f = nnx.LayerNorm(d, epsilon=1e-5, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, idx: jax.Array, *, key: jax.Array | None = None) -> jax.Array:
        t = idx.shape[1]
        x = self.tok(idx) + self.pos(jnp.arange(t))[None]
        x = _dropout(x, self.dropout, key, 0)
        for i, block in enumerate(self.blocks):
            x = block(x, None if key is None else jax.random.fold_in(key, i + 1))
        return self.lm_head(self.ln_f(x))


class MLP(nnx.Module):
    """Dense(relu) hidden layers -> Dense(1) linear (the CaAdam regression MLPs)."""

    def __init__(self, in_features: int, hidden: Sequence[int], *, rngs: nnx.Rngs):
        sizes = [in_features, *hidden]
        pairs = zip(sizes[:-1], sizes[1:], strict=True)
        self.hidden = nnx.List([nnx.Linear(a, b, kernel_init=_GLOROT, rngs=rngs) for a, b in pairs])
        self.out = nnx.Linear(sizes[-1], 1, kernel_init=_GLOROT, rngs=rngs)

    def __call__(self, x: jax.Array, *, train: bool = False) -> jax.Array:
        del train
        for layer in self.hidden:
            x = jax.nn.relu(layer(x))
        return self.out(x)[:, 0]

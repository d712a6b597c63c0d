"""--target params: per-example weight gradients of chosen linear layers, exact or projected.

It drives the hooks of `gradients` (around the pass every target shares) and the projections
of `projection`. Three kinds of output, any of them in one pass:

- kronecker "k_out x k_in": per layer vec(A^T G B) / sqrt(k_out k_in) with seeded Gaussian
  A [d_out, k_out], B [d_in, k_in], computed from the hooks without forming G; the per-layer
  vectors are concatenated (n_layers * k_out * k_in numbers).
- rademacher, normal or sjlt k: the exact per-example gradient of all chosen layers,
  flattened and concatenated (D numbers), formed one batch at a time and projected to k by the
  dense or sparse engine: one k-vector summed over layers, as LESS does.
- full: the exact D-vector itself.

Each is scaled so that inner products are unbiased estimates of the exact ones.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import torch

from gradproj.errors import UserError
from gradproj.gradients import kronecker_projected, linear_layers_captured, linear_modules
from gradproj.projection import (
    FULL,
    GENERATOR,
    KroneckerProjection,
    OutputSpec,
    default_memory_gb,
    make_projections,
    parse_kronecker_dim,
    projected_outer_sum,
    stream_key,
)
from gradproj.targets.base import Target

KRONECKER = "kronecker"
BYTES_FP32 = 4


def module_stream(name: str, side: str) -> int:
    """Generator stream of one factor ("left" A or "right" B) of one layer.

    A hash of the layer's name, so that a layer's matrices do not depend on which other
    layers were chosen; streams of the dense engine are small integers and never collide.
    """
    digest = hashlib.sha256(f"gradproj-params\0{side}\0{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def layer_projection(seed: int, layer: Layer, dims: list[str], device) -> KroneckerProjection:
    """The kronecker projection of one layer's [d_out, d_in] weight gradient: its own streams
    (`random_block("normal", seed, stream, ...)`), factors as wide as asked, whatever the layer."""
    keys = tuple(
        stream_key("normal", seed, module_stream(layer.name, s)) for s in ("left", "right")
    )
    shape = (layer.d_out, layer.d_in)
    return KroneckerProjection(dims, seed, shape, device=device, keys=keys, require_fit=False)


@dataclass
class ParamsExample:
    """One example's outputs, {spec: fp32 vector}, and its gradient norm."""

    norm: float
    vectors: dict


@dataclass
class Layer:
    name: str
    d_out: int
    d_in: int
    offset: int  # where the layer's weight gradient starts in the exact D-vector

    @property
    def size(self) -> int:
        return self.d_out * self.d_in


class ParamsTarget(Target):
    """--target params: what one extraction pass computes, and how the manifest says so."""

    name = "params"

    def __init__(
        self,
        model,
        patterns,
        include_lm_head: bool,
        specs: list[OutputSpec],
        seed: int,
        device,
        memory_gb: float | None = None,
        batch_tokens: int = 8192,
        shard_examples: int = 1000,
    ):
        super().__init__(specs)
        self.modules = linear_modules(model, patterns, include_lm_head)
        self.layers, offset = [], 0
        for name, module in self.modules:
            d_out, d_in = module.weight.shape
            self.layers.append(Layer(name, d_out, d_in, offset))
            offset += d_out * d_in
        self.dim = offset
        self.seed, self.device = int(seed), torch.device(device)
        self.memory_gb = memory_gb if memory_gb is not None else default_memory_gb(self.device)
        self.want_full = FULL in specs
        self.kronecker = [s for s in specs if s.proj_type == KRONECKER]
        dense = [s for s in specs if s.proj_type != KRONECKER]
        self.projections = make_projections(
            dense, seed, (1, self.dim), device=device, memory_gb=self.memory_gb
        )
        dims = [s.dim for s in self.kronecker]
        self.factors = {
            layer.name: layer_projection(self.seed, layer, dims, self.device).widest_factors()
            for layer in self.layers
        } if dims else {}  # fmt: skip
        self._chunk = self._check_memory(batch_tokens, shard_examples)

    @property
    def exact(self) -> bool:
        """Whether the exact per-example gradient is formed (full or dense outputs)."""
        return self.want_full or bool(self.projections)

    def _check_memory(self, batch_tokens: int, shard_examples: int) -> int:
        """Examples whose exact gradients are formed at once; refuses, with the numbers, a
        dense or full run whose estimated memory exceeds the budget."""
        if not self.exact:
            return 0
        budget = self.memory_gb * 2**30
        activations = batch_tokens * sum(la.d_in + la.d_out for la in self.layers) * BYTES_FP32
        example = self.dim * BYTES_FP32
        if activations + example > budget / 2:
            raise UserError(
                f"--target params with a dense projection or the full gradient forms each "
                f"example's gradient of {self.dim:,} weights ({example / 2**30:.2f} GiB) and keeps "
                f"{activations / 2**30:.2f} GiB of layer activations for --batch_tokens "
                f"{batch_tokens}: more than half of the {self.memory_gb:g} GiB budget. Use "
                "--proj_type kronecker, fewer --modules, a lower --batch_tokens or a higher "
                "--proj_memory_gb (dense projections suit small layers or LoRA-sized models)"
            )
        shard = shard_examples * example
        if self.want_full and shard > budget:
            raise UserError(
                f"the full parameter gradient ({self.dim:,} weights) of {shard_examples} examples "
                f"per shard needs {shard / 2**30:.2f} GiB, more than the {self.memory_gb:g} GiB "
                "budget: lower --gradients_per_file, choose fewer --modules or raise "
                "--proj_memory_gb"
            )
        return max(1, int((budget / 2 - activations) // example))

    def width(self, spec: OutputSpec) -> int:
        """Length of one example's vector for this output."""
        if spec.is_full:
            return self.dim
        return spec.k * len(self.layers) if spec.proj_type == KRONECKER else spec.k

    def capture(self):
        if self.exact:
            return linear_layers_captured(self.modules)
        return kronecker_projected(self.modules, self.factors)

    def collect(self, batch, captured, embedding_grads, hidden) -> list[ParamsExample]:
        """Every requested output of each example of one batch."""
        if self.exact:
            return self._exact_batch(captured, len(batch))
        vectors = self.kronecker_vectors(self._with_zero_layers(captured, len(batch)))
        # Without the exact gradient, the recorded norm is that of the widest projection
        # (an unbiased estimate of the squared norm; the manifest says "grad_norm": "projected").
        widest = max(vectors, key=lambda spec: spec.k)
        return [
            ParamsExample(
                float(vectors[widest][i].double().norm()), {k: v[i] for k, v in vectors.items()}
            )
            for i in range(len(batch))
        ]

    def _with_zero_layers(self, projected: dict, n: int) -> dict[str, torch.Tensor]:
        """A layer without output gradient (it does not influence the loss) contributes zero."""
        for name, (a, b) in self.factors.items():
            if name not in projected:
                projected[name] = a.new_zeros(n, a.shape[1], b.shape[1])
        return projected

    def kronecker_vectors(self, projected: dict[str, torch.Tensor]) -> dict:
        """{spec: fp32 CPU [B, n_layers * k]}, each layer's block scaled 1/sqrt(k)."""
        vectors = {}
        for spec in self.kronecker:
            k_out, k_in = parse_kronecker_dim(spec.dim)
            blocks = [projected[la.name][:, :k_out, :k_in].flatten(1) for la in self.layers]
            vectors[spec] = (torch.cat(blocks, 1) / math.sqrt(k_out * k_in)).cpu()
        return vectors

    def _exact_batch(self, captured, n: int) -> list[ParamsExample]:
        results = []
        for start in range(0, n, self._chunk):
            rows = slice(start, min(start + self._chunk, n))
            grads = captured.weight_gradients(rows)
            vectors = {FULL: grads.cpu()} if self.want_full else {}
            for proj_type, projection in self.projections.items():
                by_k = projection.project_batch([g[None] for g in grads])
                for spec in self.specs:
                    if spec.proj_type == proj_type:
                        vectors[spec] = by_k[spec.k]
            if self.kronecker:
                vectors |= self.kronecker_vectors(self._projected_from(captured, rows))
            norms = grads.double().norm(dim=1).tolist()
            results += [
                ParamsExample(norm, {k: v[i] for k, v in vectors.items()})
                for i, norm in enumerate(norms)
            ]
        return results

    def _projected_from(self, captured, rows: slice) -> dict[str, torch.Tensor]:
        projected = {}
        for layer in self.layers:
            left, right = self.factors[layer.name]
            delta = captured.output_grads.get(layer.name)
            x = captured.inputs[layer.name][rows]
            if delta is None:
                projected[layer.name] = x.new_zeros(x.shape[0], left.shape[1], right.shape[1])
            else:
                projected[layer.name] = projected_outer_sum(delta[rows], x, left, right)
        return projected

    def norm(self, payload: ParamsExample) -> float:
        return payload.norm

    def shard_vectors(self, payloads: list[ParamsExample]) -> dict:
        """{spec: fp32 [n, width]} for every output, also when no example is left."""
        return {
            spec: torch.stack([p.vectors[spec] for p in payloads])
            if payloads
            else torch.zeros(0, self.width(spec))
            for spec in self.specs
        }

    def header(self, spec: OutputSpec) -> dict:
        """Manifest fields of one output: kind, projection, layers and their slices."""
        layers = [
            {"name": la.name, "d_out": la.d_out, "d_in": la.d_in,
             "grad_slice": [la.offset, la.offset + la.size]}
            for la in self.layers
        ]  # fmt: skip
        common = {
            "params_dim": self.dim,
            "grad_norm": "exact" if self.exact else "projected",
        }
        if spec.is_full:
            for entry in layers:
                entry["slice"] = entry["grad_slice"]
            return common | {"kind": "params_full", "projection": None, "modules": layers}
        if spec.proj_type != KRONECKER:
            projection = self.projections[spec.proj_type].describe() | {"dim": spec.dim}
            return common | {"kind": "projected", "projection": projection, "modules": layers}
        return common | {
            "kind": "projected",
            "projection": self._kronecker_description(spec.dim, layers),
            "modules": layers,
        }

    def _kronecker_description(self, dim, layers: list[dict]) -> dict:
        k_out, k_in = parse_kronecker_dim(dim)
        k = k_out * k_in
        for i, entry in enumerate(layers):
            entry |= {
                "slice": [i * k, (i + 1) * k],
                "k_out": k_out,
                "k_in": k_in,
                "stream_left": module_stream(entry["name"], "left"),
                "stream_right": module_stream(entry["name"], "right"),
            }
        return {
            "type": KRONECKER,
            "dim": dim,
            "per_module": [k_out, k_in],
            "total_dim": k * len(layers),
            "seed": self.seed,
            "generator": dict(GENERATOR),
            "factors": "A = random_block('normal', seed, stream_left, 0, d_out, 0, k_out), "
            "B likewise with stream_right and d_in, k_in; block = vec(A^T G B) row-major",
            "scale": "1/sqrt(k_out * k_in) per module",
        }

"""What every projection type shares; one subclass per type, registered in `PROJECTIONS`."""

from collections.abc import Sequence

import torch

from gradproj.errors import UserError
from gradproj.projection.generator import _MAX_ROW, GENERATOR


def default_memory_gb(device: torch.device) -> float:
    """Working memory of a projection: 1 GiB on CPU, a quarter of a GPU's memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory / 4 / 2**30
    return 1.0


class Projection:
    """Projects ragged per-example gradients [len_i, cols] of a [rows, cols] layout to k dims.

    `project_batch(grads)` gives {k: fp32 CPU [B, k]} for every k in `dims`, each scaled so that
    E<Pa, Pb> = <a, b>; `describe()` is what the manifest records.
    """

    proj_type: str
    scale = "1/sqrt(k)"

    def __init__(
        self,
        dims: Sequence[int | str],
        seed: int,
        shape: tuple[int, int],
        device="cpu",
        memory_gb: float | None = None,
    ):
        self.seed = int(seed)
        self.shape = (int(shape[0]), int(shape[1]))
        self.device = torch.device(device)
        self.memory_gb = memory_gb if memory_gb is not None else default_memory_gb(self.device)
        if isinstance(dims, int | str):
            dims = [dims]
        if not dims:
            raise UserError("no projection dim given: pass at least one, e.g. --proj_dim 8192")
        self.factors = dict(self._parse_dim(spec) for spec in dims)
        self.dims = sorted(self.factors)
        self._check_arguments()

    def _parse_dim(self, spec: int | str) -> tuple[int, tuple[int, int] | None]:
        """(k, the factorization of k where the type has one)."""
        return parse_int_dim(spec), None

    def _check_arguments(self) -> None:
        rows, cols = self.shape
        if rows < 1 or cols < 1:
            raise UserError(f"bad gradient shape {self.shape}: both sizes must be at least 1")
        if self.memory_gb <= 0:
            raise UserError(f"--proj_memory_gb must be positive, got {self.memory_gb}")
        if rows * cols > _MAX_ROW:
            raise UserError(f"gradient of {rows * cols} coordinates exceeds 2**39")

    def describe(self) -> dict:
        """JSON-able description of the projection, for the manifest."""
        return {
            "type": self.proj_type,
            "dims": self.dims,
            "seed": self.seed,
            "shape": list(self.shape),
            "generator": dict(GENERATOR),
            "scale": self.scale,
        }

    def project_batch(self, grads: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        raise NotImplementedError

    def block_bytes(self) -> int:
        """Working memory of the random-matrix block generated at once (0: none generated)."""
        return 0

    def _flatten(self, grad: torch.Tensor) -> torch.Tensor:
        rows, cols = self.shape
        if grad.dim() != 2 or grad.shape[1] != cols or grad.shape[0] > rows:
            raise ValueError(f"gradient of shape {tuple(grad.shape)} does not fit {self.shape}")
        return grad.reshape(-1)

    def _flatten_all(self, grads: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Each gradient as its flat prefix of the D-vector, once the output fits the budget."""
        flats = [self._flatten(grad) for grad in grads]
        output_gb = len(flats) * self.dims[-1] * 4 / 2**30
        if output_gb > self.memory_gb / 2:
            raise UserError(
                f"projecting {len(flats)} examples to {self.dims[-1]} dims needs "
                f"{output_gb:.3g} GiB for the output alone: raise --proj_memory_gb above "
                f"{2 * output_gb:.3g}"
            )
        return flats

    def _chunk(self, flats: list[torch.Tensor], row0: int, row1: int) -> torch.Tensor:
        """fp32 [len(flats), row1-row0] on the device: coordinates row0..row1, zero past the end."""
        chunk = torch.empty(len(flats), row1 - row0, device=self.device)
        for i, flat in enumerate(flats):
            piece = flat[row0:row1]
            chunk[i, : piece.numel()] = piece.to(self.device, torch.float32)
            chunk[i, piece.numel() :] = 0
        return chunk

    @staticmethod
    def _by_length(flats: list[torch.Tensor]) -> tuple[list[int], list[int]]:
        """Example order, longest first, and each one's length in that order."""
        order = sorted(range(len(flats)), key=lambda i: -flats[i].numel())
        return order, [flats[i].numel() for i in order]


def parse_int_dim(spec: int | str) -> int:
    try:
        k = int(spec)
    except (TypeError, ValueError):
        raise UserError(f"bad projection dim {spec!r}: give a positive integer") from None
    if k < 1:
        raise UserError(f"bad projection dim {k}: it must be at least 1")
    return k

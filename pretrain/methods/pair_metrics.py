"""What contrastive learning is doing to the representation, from the two views of a batch: logged by
the two-view methods every step to tell learning from collapse (see BENCHMARKS.md's diagnosis).

Measured on the encoder's output (what kNN and linear probes see), L2-normalized, on this rank's batch:

* `repr/pair_top1`: fraction of first views whose most similar second view (cosine) is of the same
  image, the in-batch positive-pair accuracy (chance 1 / batch);
* `repr/alignment`: E ||f(x) - f(x')||^2 over positive pairs (Wang & Isola, 2020): 0 when the two
  views of an image agree, up to 4;
* `repr/uniformity`: log E exp(-2 ||f(x) - f(y)||^2) over pairs of different images: 0 when every image
  maps to one point, more negative the more evenly they spread on the sphere;
* `repr/std`: per-dimension standard deviation across the batch, averaged (0 at collapse, about
  1 / sqrt(dim) for features spread in every direction).
"""

import torch
import torch.nn.functional as F


@torch.no_grad()
def pair_metrics(first, second):
    """The four measures above of (N, D) representations of the first and second views."""
    a, b = F.normalize(first.detach().float(), dim=1), F.normalize(second.detach().float(), dim=1)
    n = len(a)
    top1 = ((a @ b.T).argmax(dim=1) == torch.arange(n, device=a.device)).float().mean()
    alignment = (a - b).pow(2).sum(dim=1).mean()
    distances = torch.pdist(a).pow(2) if n > 1 else torch.zeros(1, device=a.device)
    uniformity = distances.mul(-2).exp().mean().log()
    return {
        "repr/pair_top1": top1,
        "repr/alignment": alignment,
        "repr/uniformity": uniformity,
        "repr/std": a.std(dim=0).mean() if n > 1 else torch.zeros((), device=a.device),
    }

"""STEM's gate: every task's embeddings forward, each task's gradient only to its own.

STEM (Su et al., "STEM: Unleashing the Power of Embeddings for Multi-task Recommendation",
AAAI 2024) gives every task t embeddings of its own, e_t (here: the pooled rows of task t's tables
``task_<tower>_<feature>`` of the F listed features, concatenated, B x F*d), beside the shared
ones. With ``task_embeddings.gate: stem`` task t's tower reads, beside its shared representation,

    s_t = sum_k g_tk * e~_k        e~_t = e_t,  e~_k = stop_gradient(e_k) for k != t
    g_t = softmax(W_t [e_t ; v] + c_t)    over the T tasks

where v (B x the F features' shared widths) is the shared embeddings of the same F features
(their columns of the model input). So every tower sees every task's embeddings (all forward),
but a task's loss reaches only its own tables through s_t (task-specific backward), and, through
its gate, its own and the shared tables.

Where this differs from STEM-Net's gate in the authors' code (``models/STEM.py``):
- Its gate reads the task's and the shared embeddings summed, x_t + x_shared (one width); here
  their concatenation [e_t ; v], since the widths may differ (the sum is the case of tied weights).
  Both let the gate's gradient reach the task's own and the shared embeddings, as there.
- Its gate is an MLP (``gate_hidden_units``) whose softmax mixes expert outputs: every task's
  specific experts (other tasks' detached) and the shared experts. Here a Linear mixes the T tasks'
  embeddings themselves, and the shared side reaches the tower beside s_t, as the model class's own
  shared representation (backbone output, MMoE's mixture, PLE's last layer), not through the gate.
"""

from __future__ import annotations

import torch
from torch import nn

Device = torch.device | str | None


class TaskGate(nn.Module):
    """One softmax gate per task over the T tasks' embeddings.

    Args: num_tasks: T; task_dim: width of every e_t (F*d); shared_dim: width of v.
    forward(tasks: T x [B x task_dim], shared: B x shared_dim) -> T x [B x task_dim] (s_t).
    """

    def __init__(self, num_tasks: int, task_dim: int, shared_dim: int, device: Device = None) -> None:
        super().__init__()
        self.gates = nn.ModuleList(nn.Linear(task_dim + shared_dim, num_tasks, device=device)
                                   for _ in range(num_tasks))

    def weights(self, tasks: list[torch.Tensor], shared: torch.Tensor) -> list[torch.Tensor]:
        """T x [B x T]: task t's softmax over the tasks, from [e_t ; v]."""
        return [torch.softmax(gate(torch.cat([tasks[t], shared], dim=1)), dim=1) for t, gate in enumerate(self.gates)]

    def forward(self, tasks: list[torch.Tensor], shared: torch.Tensor) -> list[torch.Tensor]:
        out = []
        for t, g in enumerate(self.weights(tasks, shared)):
            # every task's embeddings forward; only task t's own keep their gradient
            mixed = torch.stack([e if k == t else e.detach() for k, e in enumerate(tasks)], dim=1)  # B x T x D
            out.append((g.unsqueeze(-1) * mixed).sum(1))
        return out

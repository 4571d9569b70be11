"""The process layout: TP, CP, DP, PP for dense parts and ETP, EP, EDP for experts (MoE parallel folding).

    world = PP x DP x CP x TP   (attention, norms, embeddings, router)      MiniMax eq. 15
    world = PP x EDP x EP x ETP (experts)                                   MiniMax eq. 16

Ranks are laid out exactly as megatron-core's `RankGenerator` with order "tp-cp-ep-dp-pp" (TP fastest): the
dense generator has ep=1, the expert generator tp=etp, cp=1, dp=edp. `tests/test_topology.py` checks every
group against megatron's own generator. We build the groups with `torch.distributed.new_group` instead of
calling `parallel_state.initialize_model_parallel` because importing megatron.core costs ~6 s of CPU in every
process (it loads its whole transformer stack), which every gloo test rank would pay, and its groups are
process-global singletons, while tests build several layouts in one process.

Every group a parallel module needs is an attribute (`topo.tp_group`, ...), with `topo.<name>_rank` and the
sizes `topo.tp`, ... Groups are None only in a single process without torch.distributed; the collectives in
`parallel.collectives` treat None as a group of one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch.distributed as dist

# Dense groups (the tokens of megatron's RankGenerator.get_ranks) and expert groups, by attribute name.
DENSE_GROUPS = {"tp": "tp", "cp": "cp", "dp": "dp", "pp": "pp", "dp_cp": "dp-cp", "tp_cp": "tp-cp",
                "tp_dp_cp": "tp-dp-cp"}
EXPERT_GROUPS = {"etp": "tp", "ep": "ep", "edp": "dp", "ep_etp": "tp-ep"}
ORDER = ("tp", "cp", "ep", "dp", "pp")
GRAD_SYNC_GROUPS = ("dp_cp", "tp_dp_cp", "edp", "dp")  # used between backward and the optimizer step only


def _prefix_product(sizes):
    out = [1]
    for s in sizes:
        out.append(out[-1] * s)
    return out


def rank_groups(sizes: dict[str, int], token: str) -> list[list[int]]:
    """Megatron's `generate_masked_orthogonal_rank_groups`: the groups along the dims named in `token`.

    `sizes` maps every name of ORDER to its size; ranks vary fastest along the first name of ORDER. Within a
    group, ranks are listed with the first masked dim fastest (that order is the rank inside the group).
    """
    names = token.split("-")
    shape = [sizes[n] for n in ORDER]
    stride = _prefix_product(shape)
    masked = [i for i, n in enumerate(ORDER) if n in names]
    unmasked = [i for i, n in enumerate(ORDER) if n not in names]

    def decompose(index, dims):
        out = []
        for i in dims:
            out.append(index % shape[i])
            index //= shape[i]
        return out

    group_size = math.prod(shape[i] for i in masked)
    world = math.prod(shape)
    groups = []
    for g in range(world // group_size):
        base = sum(idx * stride[i] for idx, i in zip(decompose(g, unmasked), unmasked))
        groups.append([base + sum(idx * stride[i] for idx, i in zip(decompose(r, masked), masked))
                       for r in range(group_size)])
    return groups


def validate_layout(world: int, tp: int = 1, cp: int = 1, ep: int = 1, etp: int = 1, pp: int = 1,
                    sequence_parallel: bool = False, model_cfg=None, seq_len: int | None = None) -> None:
    """Raise ValueError with one line naming the setting if the layout cannot run this model."""
    def need(ok, msg):
        if not ok:
            raise ValueError(msg)

    for name, v in (("tp", tp), ("cp", cp), ("ep", ep), ("etp", etp), ("pp", pp)):
        need(isinstance(v, int) and not isinstance(v, bool) and v >= 1,
             f"parallel.{name}={v!r} must be a positive integer")
    need(isinstance(sequence_parallel, bool), f"parallel.sequence_parallel={sequence_parallel!r} must be true/false")
    need(world % (tp * cp * pp) == 0,
         f"parallel: world size {world} is not divisible by tp*cp*pp={tp * cp * pp} (tp={tp}, cp={cp}, pp={pp})")
    need(world % (etp * ep * pp) == 0,
         f"parallel: world size {world} is not divisible by etp*ep*pp={etp * ep * pp} (etp={etp}, ep={ep}, pp={pp})")
    if model_cfg is not None:
        m = model_cfg
        need(m.num_heads % tp == 0, f"parallel.tp={tp} does not divide model.num_heads={m.num_heads}")
        need(m.num_kv_heads % tp == 0,
             f"parallel.tp={tp} does not divide model.num_kv_heads={m.num_kv_heads} (KV heads are split, not replicated)")
        need(m.vocab_size % tp == 0, f"parallel.tp={tp} does not divide model.vocab_size={m.vocab_size}")
        need(m.num_experts % ep == 0, f"parallel.ep={ep} does not divide model.num_experts={m.num_experts}")
        need(m.ffn_hidden_size % etp == 0,
             f"parallel.etp={etp} does not divide model.ffn_hidden_size={m.ffn_hidden_size}")
        need(pp == 1 or not m.tie_embeddings,
             "model.tie_embeddings=true needs parallel.pp=1 (the embedding and the head live on different stages)")
    if seq_len is not None:
        need(cp == 1 or seq_len % (2 * cp) == 0,
             f"stage.seq_len={seq_len} is not divisible by 2*parallel.cp={2 * cp} (zigzag chunks)")
        # Sequence-parallel regions and the MoE split each rank's tokens evenly over TP (with or without SP).
        need(tp == 1 or (seq_len // cp) % tp == 0,
             f"stage.seq_len={seq_len} / parallel.cp={cp} tokens per rank are not divisible by parallel.tp={tp}")


@dataclass
class Topology:
    world_size: int = 1
    rank: int = 0
    tp: int = 1
    cp: int = 1
    ep: int = 1
    etp: int = 1
    pp: int = 1
    sequence_parallel: bool = False
    seq_len: int | None = None  # tokens per window (stage.seq_len), when known
    options: dict = field(default_factory=dict)  # the rest of the parallel config (optimizer, buckets, ...)
    ranks: dict = field(default_factory=dict)  # group name -> this rank's group as global ranks
    groups: dict = field(default_factory=dict)  # group name -> ProcessGroup (None without torch.distributed)

    @property
    def dp(self) -> int:
        return self.world_size // (self.tp * self.cp * self.pp)

    @property
    def edp(self) -> int:
        return self.world_size // (self.etp * self.ep * self.pp)

    @property
    def dp_cp(self) -> int:
        return self.dp * self.cp

    def __getattr__(self, name):  # tp_group, dp_cp_group, ...; tp_rank, edp_rank, ...
        groups, ranks = self.__dict__.get("groups", {}), self.__dict__.get("ranks", {})
        if name.endswith("_group") and name[:-6] in ranks:
            return groups.get(name[:-6])
        if name.endswith("_rank") and name[:-5] in ranks:
            return ranks[name[:-5]].index(self.rank)
        raise AttributeError(name)

    def size(self, name: str) -> int:
        return len(self.ranks[name])

    @classmethod
    def build(cls, tp=1, cp=1, ep=1, etp=1, pp=1, sequence_parallel=False, model_cfg=None, seq_len=None,
              world_size=None, rank=None, **options) -> Topology:
        """Validate, then create every group (a collective call: all ranks must call it with the same sizes)."""
        initialized = dist.is_available() and dist.is_initialized()
        world = world_size if world_size is not None else (dist.get_world_size() if initialized else 1)
        rank = rank if rank is not None else (dist.get_rank() if initialized else 0)
        validate_layout(world, tp, cp, ep, etp, pp, sequence_parallel, model_cfg, seq_len)
        topo = cls(world, rank, tp, cp, ep, etp, pp, sequence_parallel and tp > 1, seq_len, dict(options))
        dense = {"tp": tp, "cp": cp, "ep": 1, "dp": topo.dp, "pp": pp}
        expert = {"tp": etp, "cp": 1, "ep": ep, "dp": topo.edp, "pp": pp}
        # Identical rank lists share one group, except that gradient-sync groups never share a communicator
        # with the groups the model uses in forward/backward: overlapped bucket all-reduces start from autograd
        # hooks at points that differ between ranks, so on a shared communicator they would interleave with the
        # model's collectives in a different order on each rank (NCCL then mixes up the operations).
        created: dict[tuple, object] = {}
        for layout, table in ((dense, DENSE_GROUPS), (expert, EXPERT_GROUPS)):
            for name, token in table.items():
                for ranks in rank_groups(layout, token):
                    key = (name in GRAD_SYNC_GROUPS, tuple(ranks))
                    if key not in created:
                        created[key] = dist.new_group(ranks) if initialized and world > 1 else None
                    if rank in ranks:
                        topo.ranks[name], topo.groups[name] = ranks, created[key]
        return topo

    @classmethod
    def from_config(cls, parallel_cfg, model_cfg=None, seq_len=None, **kwargs) -> Topology:
        """From the `parallel` config group (missing sizes default to 1; other keys go to `options`)."""
        cfg = dict(parallel_cfg.items()) if hasattr(parallel_cfg, "items") else dict(parallel_cfg)
        cfg.pop("name", None)
        sizes = {k: cfg.pop(k) for k in ("tp", "cp", "ep", "etp", "pp", "sequence_parallel") if k in cfg}
        return cls.build(**sizes, model_cfg=model_cfg, seq_len=seq_len, **cfg, **kwargs)

    def describe(self) -> str:
        return (f"world={self.world_size} tp={self.tp} cp={self.cp} dp={self.dp} pp={self.pp} ep={self.ep} "
                f"etp={self.etp} edp={self.edp} sp={self.sequence_parallel}")

"""Training under torchrun (2 processes, gloo on the CPU) keeps every rank's head identical: the same
prototypes, variances and weights after the steps, and the same post-hoc fitted statistics."""

import json
import os
import subprocess
import sys
import textwrap

RANK_SCRIPT = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from monai_ood.calibration import fingerprint
    from monai_ood.detectors import FusedDetector
    from monai_ood.engines.checkpoint import build_network, make_model_config
    from monai_ood.engines.step import TrainingForward
    from monai_ood.losses import SegOODLoss

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(0)  # the same initial weights on every rank, as DDP requires
    config = make_model_config("unet", 2, 1, 3, 8, {"channels": [4, 8, 16], "strides": [2, 2]})
    net = build_network(config)
    initial = fingerprint(net)
    model = DistributedDataParallel(TrainingForward(net))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    loss_fn = SegOODLoss(net.num_dims, lambda_out=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # every rank its own batches
    for _ in range(3):
        images = torch.rand(2, 1, 32, 32, generator=generator)
        labels = torch.randint(0, 3, (2, 1, 32, 32), generator=generator)
        outliers = torch.rand(2, 1, 32, 32, generator=generator)
        optimizer.zero_grad()
        loss = loss_fn.from_train_output(model(images, outliers), labels)
        loss.backward()
        optimizer.step()
    net.eval()
    rng = np.random.default_rng(7)  # the same fitting data on every rank
    items = [{"image": rng.random((1, 32, 32), dtype=np.float32)} for _ in range(6)]
    detector = FusedDetector(net, num_classes=3, warped_copies=0, seed=0).fit(items[:4], items[4:])
    record = {
        "weights": fingerprint(net),
        "prototypes": fingerprint(net.prototypes.state_dict()),
        "detector": fingerprint(detector.to_state()),
        "initial": initial,
        "loss": float(loss),
    }
    with open(sys.argv[1] + f"/rank{rank}.json", "w") as f:
        json.dump(record, f)
    dist.destroy_process_group()
    """
)


def test_ranks_hold_identical_heads_and_fitted_statistics_after_ddp_training(tmp_path):
    script = tmp_path / "rank.py"
    script.write_text(RANK_SCRIPT)
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",  # rendezvous on a free local port
        "--nproc_per_node",
        "2",
        str(script),
        str(tmp_path),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert ranks[0]["loss"] != ranks[1]["loss"]  # the ranks saw different batches...
    assert ranks[0]["weights"] != ranks[0]["initial"]  # (and the steps changed the weights)
    for key in ("weights", "prototypes", "detector"):  # ...and hold the same head and statistics
        assert ranks[0][key] == ranks[1][key], key

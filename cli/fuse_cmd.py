"""``cbstore fuse``: thin click wrapper over :func:`fusion.runs.run_fusion`."""

from __future__ import annotations

import click

from cli.errors import reports_errors
from fusion.config import COHORTS, make_config
from fusion.registry import FEATURE_MODES, TASKS


@click.command("fuse")
@click.argument("store", type=click.Path(path_type=str))
@click.option("--method", help="Fusion method, e.g. lgbm-early, latefusion, lstm (an unknown name "
                                "lists the valid ones).")
@click.option("--task", type=click.Choice(TASKS), help="Prediction task [mortality].")
@click.option("--fold", type=int, help="Fold of the store's splits [0].")
@click.option("--seed", type=int, help="Seed of the method and of the X-ray mask [0].")
@click.option("--features", type=click.Choice(FEATURE_MODES),
              help="cached: heads on stored embeddings (fast); raw: end to end from the raw "
                   "tensors [cached].")
@click.option("--ehr-encoder", help="EHR embedding id (cached features); default: the only one.")
@click.option("--cxr-encoder", help="X-ray embedding id (cached features); default: the only one.")
@click.option("--cxr-map-encoder", help="X-ray spatial-map embedding id (cached features of methods "
                                         "that read maps: mmtm, daft); default: the only one.")
@click.option("--cohort", type=click.Choice(COHORTS),
              help="full, matched (stays with an X-ray), or train/val on one and test on the "
                   "other [full].")
@click.option("--cxr-missing-rate", type=float,
              help="Fraction of X-rays hidden (nested, per-stay hash of seed and stay id) [0].")
@click.option("--missing-at", multiple=True,
              help="Parts the X-ray mask applies to: train,val,test (comma separated or "
                   "repeated) [train,val,test].")
@click.option("--mask-seed", type=int, help="Seed of the X-ray mask [--seed].")
@click.option("--config", "config_file", type=click.Path(dir_okay=False, path_type=str),
              help="YAML or TOML file with run options and a 'hyperparameters' mapping; "
                   "command-line options override it.")
@click.option("--preset", help="Named hyperparameter preset of the method (fusion/presets/<method>.yaml, "
                                "e.g. carebench); --config and --set override its values.")
@click.option("--set", "set_pairs", multiple=True, metavar="KEY=VALUE",
              help="Override a hyperparameter (or a run option), e.g. --set lr=3e-4; repeatable.")
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=str),
              help="Folder holding pretrained weight files named like their release assets, e.g. "
                   "resnet50-0676ba61.pth for raw runs' ImageNet ResNet-50 (searched before "
                   "$CBSTORE_WEIGHTS_DIR and torch's cache). Nothing is downloaded.")
@click.option("--device", help="cpu, cuda, cuda:1, ... [cuda when available].")
@click.option("--out", type=click.Path(file_okay=False, path_type=str),
              help="Folder of run folders [runs].")
@click.option("--n-boot", type=int, help="Bootstrap resamples of the evaluator [1000].")
@click.option("--overwrite", is_flag=True, help="Recompute a complete run instead of reusing it.")
@click.option("--progress/--no-progress", default=None, help="Progress bar per epoch [on].")
@reports_errors
def fuse(store, method, task, fold, seed, features, ehr_encoder, cxr_encoder, cxr_map_encoder, cohort,
         cxr_missing_rate, missing_at, mask_seed, config_file, preset, set_pairs, weights_dir, device,
         out, n_boot, overwrite, progress):
    """Train and evaluate one fusion METHOD on STORE; write runs/<run-id>/.

    The run id is a hash of the resolved configuration: an identical complete run is reused
    (pass --overwrite to recompute it).
    """
    from fusion.runs import run_fusion

    options = {"store": store, "method": method, "task": task, "fold": fold, "seed": seed,
               "features": features, "ehr_encoder": ehr_encoder, "cxr_encoder": cxr_encoder,
               "cxr_map_encoder": cxr_map_encoder,
               "cohort": cohort, "cxr_missing_rate": cxr_missing_rate,
               "missing_at": list(missing_at) or None, "mask_seed": mask_seed, "preset": preset,
               "weights_dir": weights_dir, "device": device,
               "out": out, "n_boot": n_boot, "overwrite": overwrite or None, "progress": progress}
    cfg = make_config(config_file=config_file, options=options, set_pairs=set_pairs)
    run_fusion(cfg, echo=click.echo)

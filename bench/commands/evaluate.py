"""`python -m bench evaluate`: the quality certificate of a model (the README's numbers for the shipped default).

Three image sets, each scored against the same held-out real reference (the model's 'val' split: shapes, or the
held-out part of a registered model's image folder; or `--reference`) with the same extractor: (a) dense samples
of the model (its default sampling; balanced labels i mod C; batch b uses seed+b), (b) real held-out images of the
'test' split, as many as samples where the data has them (the floor: what a perfect model would get at this sample
count; n/a for a reference given by path, which has no second held-out set), (c) samples of the same VAR
architecture freshly initialised (`VAR(cfg).init_weights()`, seeded) through the same VQ-VAE (the ceiling of an
untrained model). Each row also gives the class accuracy: the share of images the model's classifier assigns to
their conditioning class (n/a when the model has no classifier of its own).
"""
from __future__ import annotations


from bench.commands._common import (add_model_args, add_sampling_args, bundle_from_args, check_flags,
                                    check_writable_file, sampling_from_args)

ORDER = 35


def register(sub):
    p = sub.add_parser("evaluate", help="quality certificate of a model: FID and class accuracy of dense samples vs "
                                        "real held-out images, real-vs-real floor, untrained-model ceiling")
    add_model_args(p)
    add_sampling_args(p)
    p.add_argument("--samples", type=int, default=1000, help="images per set (>= 2)")
    p.add_argument("--seed", type=int, default=0, help="batch b of the samples uses seed+b; also seeds the "
                                                       "untrained VAR and the bootstrap")
    p.add_argument("--batch-size", type=int, default=100, help="generation batch size")
    p.add_argument("--reference", default=None, help="reference set (default: the model's held-out 'val' split): "
                   "an image folder or an .npz with mu/sigma and/or arr_0")
    p.add_argument("--reference-count", type=int, default=None,
                   help="held-out real reference images (default: shapes 5000, a folder's whole 'val' split)")
    p.add_argument("--inception-weights", default=None, help="use Inception-v3 with these weights as extractor")
    p.add_argument("--bootstrap", type=int, default=100, help="FID bootstrap resamples (0: no interval)")
    p.add_argument("--classifier", default=None, help="quality classifier .safetensors (default: the model's)")
    p.add_argument("--out", default=None, help="also write all numbers to this .json")
    p.set_defaults(func=run)


def _environment(device: str) -> dict:
    import platform
    import socket

    import torch
    from bench.train import code_commit
    dev = torch.device(device)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else (platform.processor() or platform.machine())
    return dict(env_torch=torch.__version__, env_python=platform.python_version(), env_platform=platform.platform(),
                env_device=device, env_device_name=name, env_threads=torch.get_num_threads(),
                env_code_commit=code_commit(), env_host=socket.gethostname())


def _generate_set(net, bundle, n, batch_size, seed, sampling):
    """uint8 images and labels; balanced labels i mod C; batch b uses seed + b."""
    import torch
    from bench.quality import to_uint8
    from bench.sampling import generate
    images, labels = [], []
    for b, start in enumerate(range(0, n, batch_size)):
        lab = torch.arange(start, min(start + batch_size, n)) % bundle.num_classes
        gen = generate(net, bundle.vqvae, lab.to(bundle.device), seed + b, sampling)
        images.append(to_uint8(gen.images).cpu())
        labels.append(lab)
    return torch.cat(images), torch.cat(labels)


def _jsonable(x):
    """Strict JSON: NaN -> null, numpy scalars -> numbers."""
    import math
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        x = x.item()
    return None if isinstance(x, float) and math.isnan(x) else x


def _fmt(x, spec=".3f"):
    import math
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def run(a):
    import json
    import time

    import torch
    from bench import quality
    from bench.atomic import atomic_write_text
    from bench.data import load_split, shapes_images
    from bench.models.var import VAR

    # ---- validate everything before generating anything
    from bench.measure import MAX_BOOTSTRAP, MAX_SEED
    check_flags(a, samples=(2, None, " (FID needs a covariance)"), seed=(0, MAX_SEED), batch_size=(1,),
                bootstrap=(0, MAX_BOOTSTRAP))
    if a.out:
        check_writable_file(a.out, (".json",), "--out")
    bundle = bundle_from_args(a)
    sampling = sampling_from_args(a, bundle)
    ref = quality.parse_reference(bundle, a.reference, a.reference_count)
    metrics = tuple(m for m in quality.METRICS if not quality.metric_requirements(a.samples, ref.count, (m,),
                                                                                   ref.has_images))  # valid at N
    check = quality.check_reference(bundle, a.samples, a.reference, a.inception_weights, metrics,
                                    reference_count=a.reference_count, classifier=a.classifier)
    has_classifier = bool(a.classifier or bundle.classifier)
    ds = bundle.dataset or {}
    floor_data = None if a.reference is not None or ds.get("reference") else \
        ("shapes" if ds.get("name") == "shapes" else ds.get("path"))

    from bench.log import get_logger
    log = get_logger("evaluate").info

    started, t0 = time.strftime("%Y-%m-%dT%H:%M:%S%z"), time.time()
    n, C = a.samples, bundle.num_classes
    sets = {}
    log(f"generating {n} dense samples of {bundle.model_id} ({sampling.to_dict()})")
    t = time.time()
    sets["dense"] = (*_generate_set(bundle.var, bundle, n, a.batch_size, a.seed, sampling), time.time() - t)
    log(f"generating {n} samples of an untrained VAR (same config, init_weights, seed {a.seed})")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(a.seed)
        untrained = VAR(bundle.var.cfg).init_weights().to(bundle.device).eval()
    t = time.time()
    sets["untrained"] = (*_generate_set(untrained, bundle, n, a.batch_size, a.seed, sampling), time.time() - t)
    if floor_data is not None:
        size = int(ds.get("image_size", bundle.image_size))
        if floor_data == "shapes":
            imgs, labels = shapes_images("test", n, size, num_classes=C)
            sets["real_test"] = (torch.from_numpy(imgs).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(labels),
                                 0.0)
        else:   # a class-stratified sample of the folder's 'test' split (all of it if smaller than n)
            imgs, labels, _, rec = load_split(floor_data, "test", n, size, 0, ds.get("partition"))
            if rec.count < n:
                log(f"the floor uses all {rec.count} images of the folder's test split (fewer than {n})")
            sets["real_test"] = (imgs.add(1).mul(127.5).round().clamp(0, 255).to(torch.uint8), labels, 0.0)

    titles = {"dense": f"dense samples (cfg={sampling.cfg}, top_k={sampling.top_k}, top_p={sampling.top_p})",
              "real_test": f"real held-out images (test split{'' if floor_data == 'shapes' else ' of the folder'})",
              "untrained": f"untrained VAR (init_weights, seed {a.seed})"}
    rows = {}
    for key in ("dense", "real_test", "untrained"):
        if key not in sets:
            rows[key] = dict(set=titles[key] + ": n/a (no second held-out set beside --reference)", images=0)
            continue
        images, labels, gen_s = sets[key]
        q = quality.quality_metrics(images.to(bundle.device), bundle, labels=labels, metrics=metrics,
                                    bootstrap=a.bootstrap, seed=a.seed, reference=a.reference,
                                    reference_count=a.reference_count, classifier=a.classifier,
                                    inception_weights=a.inception_weights)
        acc = None
        if has_classifier:   # the model's classifier, also when Inception measures FID
            logits = quality.classifier_logits(images.to(bundle.device), bundle, a.classifier)
            acc = quality.class_accuracy(logits, labels)
        rows[key] = dict(set=titles[key], images=len(images), classifier_accuracy=acc, generate_s=round(gen_s, 3), **q)

    print(f"quality certificate: {bundle.model_id} | {n} images per set | reference {check['reference']} | "
          f"extractor {check['extractor']}")
    head = f"{'set':<52}{'FID':>9}{'95% interval':>21}{'prec':>7}{'recall':>8}{'KID':>9}{'IS':>7}{'cls acc':>9}"
    print(head)
    print("-" * len(head))
    for r in rows.values():
        if not r["images"]:
            print(r["set"])
            continue
        ci = f"[{_fmt(r['fid_ci_low'])}, {_fmt(r['fid_ci_high'])}]"
        print(f"{r['set']:<52}{_fmt(r['fid']):>9}{ci:>21}{_fmt(r['precision']):>7}{_fmt(r['recall']):>8}"
              f"{_fmt(r['kid_mean']):>9}{_fmt(r['isc_mean'], '.2f'):>7}{_fmt(r['classifier_accuracy']):>9}")
    print(f"FID interval: class-stratified bootstrap ({a.bootstrap} resamples) of each set against the fixed "
          f"reference; seeds: batch b of the samples uses {a.seed}+b")

    if a.out:
        report = dict(command="evaluate", model=bundle.name, model_id=bundle.model_id, model_source=bundle.source,
                      sampling=sampling.to_dict(), samples=n, seed=a.seed, batch_size=a.batch_size,
                      seed_scheme="batch b (labels i mod num_classes) uses seed+b",
                      untrained_init_seed=a.seed, metrics=list(metrics), bootstrap=a.bootstrap,
                      reference=check["reference"], reference_count=check["reference_count"],
                      reference_split=json.loads(rows["dense"].get("reference_split") or "null"),
                      extractor=check["extractor"], rows=rows, **_environment(str(bundle.device)),
                      started_at=started, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                      wall_s=round(time.time() - t0, 3))
        atomic_write_text(a.out, json.dumps(_jsonable(report), indent=1))
        print(f"wrote {a.out}")
    return 0

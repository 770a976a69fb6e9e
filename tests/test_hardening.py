"""Issue 10, the hostile audit: non-finite parameters and weights, sweep YAML node types, twin columns, the
Inception code-execution window, training arguments, a full disk, an address that is not Ray, checkpoint errors
in our words, temp files on a shared results directory, and parity details of the VQ-VAE."""
import copy
import json
import math
import os
import re
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
import yaml

from bench.errors import BenchError, NonFiniteOutput
from tests.conftest import run_cli

NON_FINITE = ["nan", "inf", "-inf", "1e999"]


def _cli(args, capsys):
    """In-process `python -m bench ...`: (exit code, stdout, stderr)."""
    from bench.cli import main
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return e.value.code, out, err.strip()


# ------------------------------------------------------------------------------------------- 1. parameters
def _float_params():
    from bench.registry import list_methods, method_class
    return [(m, p.name) for m in list_methods() for p in method_class(m).params if p.type is float]


@pytest.mark.parametrize("method,param", _float_params())
def test_every_float_param_rejects_non_finite_values(method, param):
    from bench.registry import create_method
    for text in NON_FINITE + [float("nan"), float("inf")]:
        with pytest.raises(BenchError, match="must be finite") as e:
            create_method(method, **{param: text})
        assert "\n" not in str(e.value) and param in str(e.value)


def test_run_with_nan_tau_exits_2_and_writes_nothing(tmp_path, capsys):
    res = tmp_path / "results"
    for v in ("nan", "inf"):
        code, out, err = _cli(["run", "--method", "dmoe", "--set", f"tau={v}", "--samples", 4, "--results", res],
                              capsys)
        assert code == 2 and err == f"error: method dmoe: tau={v} is not a valid float (must be finite); " \
                                    "valid: float in [0.0, 1.0] (or a list)"
    code, _, err = _cli(["run", "--method", "actvar", "--set", "token_rate=nan", "--results", res], capsys)
    assert code == 2 and "token_rate=nan" in err and "\n" not in err
    assert not res.exists()


def test_non_finite_sampling_settings_are_refused(tmp_path, capsys):
    res = tmp_path / "results"
    for flag in ("--cfg", "--top-p"):
        code, _, err = _cli(["run", "--model", "tiny", flag, "nan", "--results", res], capsys)
        assert code == 2 and err.startswith(f"error: {flag} must be") and "got nan" in err
    for key in ("cfg", "top_p"):
        code, _, err = _cli(["sweep", "tau", "--dry-run", "--results", res, "--set", f"sampling.{key}=.nan"], capsys)
        assert code == 2 and err == f"error: --set sampling.{key}: sampling.{key} must be a finite number, got nan"
    assert not res.exists()


# ------------------------------------------------------------------------------------------- 2. weights
def test_non_finite_weights_are_refused_at_load(tmp_path):
    from bench.checkpoints import read_state_dict
    from bench.zoo import load_official
    from tests.test_models import official_var_state_dict
    sd = official_var_state_dict(depth=1)
    good = tmp_path / "var_d1.pth"
    torch.save(sd, good)
    for name, value in (("head.weight", float("nan")), ("blocks.0.ffn.fc1.weight", float("inf"))):
        bad = copy.deepcopy(sd)
        bad[name].view(-1)[3] = value
        path = tmp_path / f"bad-{name}.pth"
        torch.save(bad, path)
        with pytest.raises(BenchError, match=rf"contains non-finite values \(NaN or Inf\) in 1 tensor\(s\): "
                                             rf"{name}; refusing") as e:
            load_official(str(path), str(good))
        assert "\n" not in str(e.value)
    # an additive attention mask is -inf by design; NaN in it is not
    mask = {"attn_bias_for_masking": torch.tensor([[0.0, -math.inf]]), "w": torch.ones(2)}
    from safetensors.torch import save_file
    save_file(mask, str(tmp_path / "mask.safetensors"))
    assert read_state_dict(str(tmp_path / "mask.safetensors"))["w"].sum() == 2
    mask["attn_bias_for_masking"][0, 0] = math.nan
    save_file(mask, str(tmp_path / "mask.safetensors"))
    with pytest.raises(BenchError, match="non-finite"):
        read_state_dict(str(tmp_path / "mask.safetensors"))


def test_complex_weights_with_nan_or_inf_are_refused():
    from bench.checkpoints import check_finite
    check_finite({"z": torch.tensor([1 + 2j, 3 - 1j])}, "weights")
    for bad in (complex(math.nan, 0), complex(0, math.inf)):
        with pytest.raises(BenchError, match="non-finite"):
            check_finite({"z": torch.tensor([1 + 2j, bad], dtype=torch.complex64)}, "weights")


def test_stored_batches_and_dense_outputs_are_read_back_only_when_whole(tmp_path):
    """A checkpointed batch (or dense entry) with the right key but damaged contents is regenerated, never
    trusted: missing scale, float images, NaN, wrong row counts."""
    from safetensors.torch import save_file
    from bench.measure import load_dense_outputs
    from bench.resume import BatchStore
    store = BatchStore(str(tmp_path / "b"), {"k": 1})
    tokens = [torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 4, dtype=torch.long)]
    images = torch.zeros(2, 3, 8, 8, dtype=torch.uint8)
    store.save(0, tokens, images)
    got = store.load(0, 2)
    assert got is not None and [t.tolist() for t in got[0]] == [t.tolist() for t in tokens] and store.resumed == 1
    meta = {"key": store.key_text}
    good = {"tokens.0": tokens[0].int(), "tokens.1": tokens[1].int(), "images": images}
    for bad in ({"tokens.0": tokens[0].int(), "tokens.2": tokens[1].int(), "images": images},   # a scale missing
                dict(good, images=torch.full((2, 3, 8, 8), math.nan)),                        # float NaN images
                dict(good, **{"tokens.1": tokens[1][:1].int()}),                               # too few rows
                {"tokens.0": tokens[0].int(), "tokens.1": tokens[1].int()}):                   # no images
        save_file(bad, store._file(0), metadata=meta)
        assert store.load(0, 2) is None and store.resumed == 1
        save_file(bad, str(tmp_path / "dense.safetensors"))
        assert load_dense_outputs(str(tmp_path / "dense.safetensors")) is None
    save_file(good, str(tmp_path / "dense.safetensors"))
    assert load_dense_outputs(str(tmp_path / "dense.safetensors"))[1].shape == (2, 3, 8, 8)


def test_an_incomplete_artifact_directory_is_replaced_not_returned(tmp_path):
    from bench.artifacts import artifact_dir_for_writing, is_done, write_artifact

    def files(d):
        with open(os.path.join(d, "w.txt"), "w") as f:
            f.write("x")
        return {}
    final = artifact_dir_for_writing("demo", "m", {"a": 1}, str(tmp_path))
    os.makedirs(final)                                   # left by a crash or an older version: no DONE
    assert write_artifact("demo", "m", {"a": 1}, str(tmp_path), files) == final
    assert is_done(final) and os.path.isfile(os.path.join(final, "w.txt"))


def test_non_finite_weights_through_the_cli(tmp_path, capsys):
    from tests.test_models import official_var_state_dict
    sd = official_var_state_dict(depth=1)
    sd["head.bias"][0] = float("nan")
    torch.save(sd, tmp_path / "var.pth")
    out = tmp_path / "grid.png"
    code, _, err = _cli(["sample", "--var-ckpt", tmp_path / "var.pth", "--vae-ckpt", tmp_path / "var.pth",
                         "--out", out], capsys)
    assert code == 2 and err.startswith("error: VAR checkpoint") and "head.bias" in err and "\n" not in err
    assert not out.exists()


def _poison(module, prefix, value=float("nan")):
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith(prefix):
                p.view(-1)[0] = value
                return name
    raise AssertionError(f"no parameter {prefix}*")


def test_generation_refuses_non_finite_logits_and_images(tiny):
    from bench.sampling import generate
    labels = torch.arange(4)
    ok = generate(tiny.var, tiny.vqvae, labels, 0, tiny.sampling)
    assert torch.isfinite(ok.images).all()
    nan_head = copy.deepcopy(tiny.var)
    _poison(nan_head, "head.weight")
    with pytest.raises(NonFiniteOutput, match="non-finite logits at scale 0"):
        generate(nan_head, tiny.vqvae, labels, 0, tiny.sampling)
    inf_decoder = copy.deepcopy(tiny.vqvae)
    _poison(inf_decoder, "decoder", float("inf"))
    with pytest.raises(NonFiniteOutput, match="non-finite decoded images"):
        generate(tiny.var, inf_decoder, labels, 0, tiny.sampling)


def test_a_run_never_stores_a_row_from_non_finite_outputs(tiny, tmp_path):
    import dataclasses
    from bench.measure import measure
    vq = copy.deepcopy(tiny.vqvae)
    _poison(vq, "decoder")
    bad = dataclasses.replace(tiny, vqvae=vq, model_id=tiny.model_id + "-nan")
    res = tmp_path / "results"
    with pytest.raises(NonFiniteOutput, match="no sample or row is produced"):
        measure(bad, "dense", samples=8, batch_size=4, results_dir=str(res), metrics=("fid",), bootstrap=0,
                timing_rounds=0, cache_dir=str(tmp_path / "cache"), classifier=_random_classifier(tmp_path),
                reference_count=16)
    assert not (res / "rows").exists() or not os.listdir(res / "rows")


def _random_classifier(tmp_path):
    from safetensors.torch import save_file
    from bench.models.classifier import ShapesClassifier
    torch.manual_seed(0)
    net = ShapesClassifier(num_classes=10, width=8, feature_dim=16, image_size=32)
    path = tmp_path / "classifier.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return str(path)


# ------------------------------------------------------------------------------------------- 3, 4. sweep files
def _write_sweep(tmp_path, data, name="s.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return str(p)


def test_sweep_points_as_a_list_is_one_line(tmp_path, capsys):
    path = _write_sweep(tmp_path, {"points": ["dense", "dmoe"]})
    code, _, err = _cli(["sweep", path, "--dry-run", "--results", tmp_path / "res"], capsys)
    assert code == 2 and err == "error: sweep s: points must be a mapping, got ['dense', 'dmoe']"
    assert not (tmp_path / "res").exists()


def test_every_node_of_a_sweep_file_with_a_wrong_type_is_a_one_line_error(tmp_path):
    """Replace each node of sweeps/tau.yaml by values of other types: the spec is either accepted or refused
    with one BenchError line; nothing else is raised."""
    from bench.sweep.spec import load_spec, read_yaml, sweep_path
    from bench.sweep.trials import expand
    raw = read_yaml(sweep_path("tau"))

    def paths(node, pre=()):
        yield pre
        children = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
        for k, v in children:
            yield from paths(v, pre + (k,))
    others = [[1, 2], "x", 3, None, {"a": 1}, 1.5, True, [], {}, [{"a": 1}], float("nan")]
    refused = 0
    for path in list(paths(raw))[1:]:
        for value in others:
            data = copy.deepcopy(raw)
            node = data
            for k in path[:-1]:
                node = node[k]
            node[path[-1]] = value
            f = _write_sweep(tmp_path, data)
            for quick in (False, True):
                try:
                    expand(load_spec(f, quick=quick))
                except BenchError as e:
                    refused += 1
                    assert "\n" not in str(e)
    assert refused > 500   # most replacements are wrong; every one was refused in one line


def test_twin_column_is_checked_before_any_trial_runs(tmp_path, capsys):
    res = tmp_path / "res"
    code, _, err = _cli(["sweep", "tau", "--dry-run", "--results", res,
                         "--set", "points.dmoe.twins.static.from_parent.match_macs=no_such_column"], capsys)
    assert code == 2 and "from_parent.match_macs names column 'no_such_column', which rows of dmoe do not have" \
        in err and "macs_analytic_all" in err and "\n" not in err
    assert not res.exists()
    # the parent's parameters are columns too (param_<name>)
    code, out, err = _cli(["sweep", "activation", "--quick", "--dry-run", "--results", res], capsys)
    assert code == 0, err


# ------------------------------------------------------------------------------------------- 5. Inception
class _Marker:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_inception_weights_are_read_once_and_never_unpickled_from_the_users_file(tmp_path, monkeypatch):
    import torch_fidelity.utils
    from bench.quality import extractors as Q
    weights = {"conv.weight": torch.randn(4, 3), "fc.bias": torch.randn(4)}
    user_file = tmp_path / "inception.pth"
    torch.save(weights, user_file)
    seen = {}

    def fake_create(name, layers, cuda=False, **kw):   # what torch-fidelity does: torch.load(weights_only=False)
        path = kw["feature_extractor_weights_path"]
        seen["path"] = path
        seen["state"] = torch.load(path, weights_only=False)
        return torch.nn.Identity()
    monkeypatch.setattr(torch_fidelity.utils, "create_feature_extractor", fake_create)
    Q._EXTRACTORS.clear()
    ext = Q.resolve_extractor(inception_weights=str(user_file))
    marker = tmp_path / "code-ran"
    torch.save({"conv.weight": _Marker(str(marker))}, user_file)     # swapped after the check
    ext.module(torch.device("cpu"))
    assert not marker.exists()
    assert os.path.realpath(seen["path"]) != os.path.realpath(user_file) and not os.path.exists(seen["path"])
    assert seen["state"].keys() == weights.keys() and all(torch.equal(seen["state"][k], weights[k]) for k in weights)
    Q._EXTRACTORS.clear()
    # the swapped file itself is refused, in one line, without running it
    with pytest.raises(BenchError, match="contains pickled Python objects") as e:
        Q.resolve_extractor(inception_weights=str(user_file))
    assert not marker.exists() and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------- 6. training
@pytest.mark.parametrize("args,needle", [
    (["--steps", "-3"], "--steps must be a positive integer, got -3"),
    (["--steps", "0"], "--steps must be a positive integer, got 0"),
    (["--lr", "nan"], "--lr must be a finite positive number, got nan"),
    (["--batch", "0"], "--batch must be a positive integer, got 0"),
])
def test_train_rejects_bad_arguments_before_writing(tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    code, _, err = _cli(["train", "vqvae", "--out", out, *args], capsys)
    assert code == 2 and err == f"error: {needle}"
    assert not out.exists()


def test_train_out_must_be_a_directory_and_pickled_state_is_refused(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    t = time.time()
    code, _, err = _cli(["train", "vqvae", "--out", afile], capsys)
    assert code == 2 and err == f"error: --out '{afile}' is an existing file; give a directory (new, or one to " \
                                "resume)" and time.time() - t < 10
    out = tmp_path / "run"
    out.mkdir()
    marker = tmp_path / "code-ran"
    torch.save({"model": _Marker(str(marker))}, out / "vqvae-state.pt")
    code, _, err = _cli(["train", "vqvae", "--out", out, "--steps", 1, "--count", 8, "--batch", 4, "--threads", 1],
                        capsys)
    assert code == 2 and "cannot read training state (resume file)" in err and "contains pickled Python objects" \
        in err and "refused without running them" in err and "\n" not in err
    assert not marker.exists() and sorted(os.listdir(out)) == ["vqvae-state.pt"]


# ------------------------------------------------------------------------------------------- 7. disk full
def test_a_full_disk_is_refused_up_front_and_a_failed_write_prints_the_row(tmp_path, capsys, monkeypatch):
    import shutil
    from collections import namedtuple
    clf = _random_classifier(tmp_path)
    res, cache = tmp_path / "results", tmp_path / "cache"
    base = ["run", "--model", "tiny", "--samples", 12, "--batch-size", 4, "--results", res, "--classifier", clf,
            "--reference-count", 16, "--metrics", "fid", "--bootstrap", 0, "--timing-rounds", 0,
            "--cache-dir", cache, "--threads", 1]
    real = shutil.disk_usage
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 << 20, (10 << 20) - 4096, 4096))
    code, out, err = _cli(base, capsys)
    assert code == 2 and err.startswith("error: not enough free disk space for the results") and "\n" not in err
    assert not res.exists() and not cache.exists()
    monkeypatch.setattr(shutil, "disk_usage", real)

    import bench.results

    def full(results_dir, row):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(bench.results, "append_row", full)
    code, out, err = _cli(base, capsys)
    err = err.splitlines()[-1]   # after the run's log lines
    assert code == 2 and err.startswith("error: the measurement finished but its row could not be written") \
        and "No space left on device" in err
    row = json.loads(out.strip().splitlines()[-1])
    assert row["model"] == "tiny" and row["samples"] == 12 and math.isfinite(row["fid"])
    assert not (res / "rows").exists() or not [f for f in os.listdir(res / "rows") if not f.startswith(".")]


# ------------------------------------------------------------------------------------------- 8. not a Ray address
def test_an_address_that_is_not_ray_fails_fast_in_one_line():
    from bench.sweep.runner import check_address
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]
    held = []
    stop = threading.Event()

    def accept():   # accept and hold connections, say nothing: not a gRPC server
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass
    th = threading.Thread(target=accept, daemon=True)
    th.start()
    try:
        t = time.time()
        with pytest.raises(BenchError, match=r"no Ray \(gRPC\) server answered") as e:
            check_address(f"127.0.0.1:{port}")
        assert time.time() - t < 20 and "\n" not in str(e.value)
    finally:
        stop.set()
        th.join()
        for c in held:
            c.close()
        server.close()


def test_a_grpc_server_that_is_not_a_gcs_is_refused_and_a_gcs_is_accepted():
    """An HTTP/2 proxy or another gRPC service answers UNIMPLEMENTED: refused at once. A GCS answers GetClusterId."""
    from concurrent import futures
    import grpc
    from bench.sweep.runner import check_address

    class FakeGcs(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method == "/ray.rpc.NodeInfoGcsService/GetClusterId":
                return grpc.unary_unary_rpc_method_handler(lambda req, ctx: b"")
            return None
    for handlers, expect in (((), "it is not a Ray cluster's GCS"), ((FakeGcs(),), None)):
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=handlers)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        try:
            if expect is None:
                assert check_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
            else:
                t = time.time()
                with pytest.raises(BenchError, match=expect):
                    check_address(f"127.0.0.1:{port}")
                assert time.time() - t < 10
        finally:
            server.stop(0)


def test_a_gcs_that_wants_a_token_is_refused_up_front_without_one(monkeypatch, tmp_path):
    """A GCS with token authentication answers UNAUTHENTICATED: without a token here, one line at once (ray.init
    would log an error every few seconds for about a minute); with RAY_AUTH_MODE=token and a token, accepted."""
    from concurrent import futures
    import grpc
    from bench.sweep.runner import check_address

    class TokenGcs(grpc.GenericRpcHandler):
        def service(self, details):
            if details.method == "/ray.rpc.NodeInfoGcsService/GetClusterId":
                return grpc.unary_unary_rpc_method_handler(
                    lambda req, ctx: ctx.abort(grpc.StatusCode.UNAUTHENTICATED, "token required"))
            return None
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2), handlers=(TokenGcs(),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    monkeypatch.setenv("HOME", str(tmp_path))
    for var in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(var, raising=False)
    try:
        t = time.time()
        with pytest.raises(BenchError, match="requires token authentication and no token is set") as e:
            check_address(f"127.0.0.1:{port}")
        assert time.time() - t < 10 and "\n" not in str(e.value) and "RAY_AUTH_MODE=token" in str(e.value)
        monkeypatch.setenv("RAY_AUTH_MODE", "token")
        monkeypatch.setenv("RAY_AUTH_TOKEN", "secret")
        assert check_address(f"127.0.0.1:{port}") == f"127.0.0.1:{port}"
    finally:
        server.stop(0)


def test_the_printed_resume_command_repeats_every_flag():
    import shlex
    from bench.cli import build_parser
    from bench.commands.sweep import resume_command
    argv = ["sweep", "tau", "--quick", "--set", "samples=32", "--set", "points.dmoe.grid.tau=0.9,0.7",
            "--results", "/tmp/my store", "--address", "auto", "--cpus-per-trial", "1", "--resolve", "2",
            "--max-samples", "4000", "--concurrent", "2", "--status-every", "5"]
    a = build_parser().parse_args(argv)
    words = shlex.split(resume_command(a))
    assert words[:5] == ["python", "-m", "bench", "sweep", "tau"] and "--resume" in words
    again = build_parser().parse_args(words[3:])
    for k in ("name", "quick", "set", "results", "address", "cpus_per_trial", "resolve", "max_samples", "concurrent",
              "status_every", "model", "device", "gpus_per_trial", "generation_workers"):
        assert getattr(again, k) == getattr(a, k), k
    assert again.resume


# ------------------------------------------------------------------------------------------- 9. checkpoint errors
def test_unreadable_checkpoints_are_named_in_our_words(tmp_path):
    from bench.checkpoints import read_state_dict
    good = tmp_path / "good.pth"
    torch.save({"w": torch.ones(1000)}, good)
    data = good.read_bytes()
    cases = {"empty.pth": (b"", "the file is empty (0 bytes)"),
             "empty.safetensors": (b"", "the file is empty (0 bytes)"),
             "truncated.pth": (data[:len(data) // 2], "the file is truncated or corrupt"),
             "garbage.pth": (os.urandom(300), "corrupt or not a PyTorch/safetensors weights file"),
             "garbage.safetensors": (b"\x10" + os.urandom(200), "corrupt")}
    for name, (content, words) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(BenchError) as e:
            read_state_dict(str(tmp_path / name), "VAR checkpoint")
        msg = str(e.value)
        assert msg.startswith(f"cannot read VAR checkpoint {tmp_path / name}: ") and words in msg, msg
        assert "\n" not in msg and "weights_only" not in msg and "EOFError" not in msg
    marker = tmp_path / "code-ran"
    torch.save({"w": _Marker(str(marker))}, tmp_path / "evil.pth")
    with pytest.raises(BenchError) as e:
        read_state_dict(str(tmp_path / "evil.pth"), "VAR checkpoint")
    assert re.fullmatch(re.escape(f"cannot read VAR checkpoint {tmp_path / 'evil.pth'}: it contains pickled Python "
                                  "objects (") + r"[\w.]*open" + re.escape(
                                      "), not only tensors; refused without running them. Re-save it as a state "
                                      "dict of tensors or as .safetensors"), str(e.value)), str(e.value)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------- 10. temp files
def test_temp_files_are_cleaned_only_for_dead_writers_of_this_host(tmp_path):
    from bench.atomic import host_tag
    from bench.results import ROWS, clean_temp_files
    rows = tmp_path / ROWS
    rows.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine_dead = rows / f".tmp-{host_tag()}-{dead.pid}-0123abcd.parquet"
    mine_alive = rows / f".tmp-{host_tag()}-{os.getpid()}-0123abcd.parquet"
    other_host = rows / f".tmp-{host_tag()}-node2-{dead.pid}-0123abcd.parquet"   # a host named like ours, plus more
    for p in (mine_dead, mine_alive, other_host):
        p.write_bytes(b"partial")
    assert clean_temp_files(str(tmp_path)) == 1
    assert sorted(p.name for p in rows.iterdir()) == sorted([mine_alive.name, other_host.name])


# ------------------------------------------------------------------------------------------- 11. parity details
def test_vqvae_is_frozen_and_its_bicubic_residuals_are_contiguous(tiny):
    from bench.zoo import load_model
    for bundle in (tiny, load_model("default")):
        assert not any(p.requires_grad for p in bundle.vqvae.parameters())
    quant, pns = tiny.vqvae.quantize, tiny.vqvae.v_patch_nums
    seen = []
    hooks = [quant.phi(si).register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous()))
             for si in range(len(pns))]
    try:
        quant.quantize(torch.randn(2, quant.Cvae, pns[-1], pns[-1], generator=torch.Generator().manual_seed(0)))
    finally:
        for h in hooks:
            h.remove()
    assert len(seen) >= len(pns) and all(seen)   # as released: .contiguous() after the bicubic upsample


def test_folders_named_like_our_packages_in_the_working_directory_do_not_shadow_them(tmp_path):
    """`python -m bench` puts the working directory first on sys.path: its ./reports (which `report` itself writes
    by default), ./sweeps or ./methods folder used to be imported as an empty namespace package in place of ours
    (report: ImportError; sweep --list: TypeError). Run as an installed user would, without PYTHONPATH."""
    for name in ("reports", "sweeps", "methods"):
        (tmp_path / name).mkdir()
    env = {"PYTHONPATH": "", "HOME": str(tmp_path / "home")}
    r = run_cli("sweep", "--list", cwd=tmp_path, env=env)
    assert r.returncode == 0 and "tau" in r.stdout, r.stderr
    r = run_cli("report", "--results", tmp_path / "no-results", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "Traceback" not in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    r = run_cli("run", "--method", "nosuch", cwd=tmp_path, env=env)
    assert r.returncode == 2 and "unknown method 'nosuch'; valid:" in r.stderr and "dense" in r.stderr, r.stderr


# ------------------------------------------------------------------------- the CLI review of 2026-11-30
@pytest.mark.parametrize("args,msg", [
    (["run", "--threads", "100000"], "--threads must be in 1..512"),                      # torch: SIGSEGV
    (["run", "--warmup-batches", "99999"], "--warmup-batches must be in 0..1000"),        # never finished
    (["run", "--timing-rounds", "99999999"], "--timing-rounds must be in 0..1000"),
    (["run", "--bootstrap", "1000000000"], "--bootstrap must be in 0..100000"),
    (["run", "--metrics", "fid", "--reference-count", "999999999"], "--reference-count must be in 1..1000000"),
    (["run", "--results", ""], "--results is empty"),                                     # was ./rows/*.parquet
    (["run", "--cache-dir="], "--cache-dir is empty"),
    (["run", "--trial-key", " "], "--trial-key is empty"),
    (["bench-moe", "--fractions", "nan"], "--fractions values must be in (0.0, 1.0]"),   # was a ValueError
    (["bench-moe", "--min-sample-ms", "nan"], "--min-sample-ms must be >= 0"),
    (["bench-moe", "--seed", "-1"], "--seed must be in 0..1099511627776"),
    (["bench-moe", "--shapes", "0:0:0"], "C, FFN and every pn must be >= 1"),            # printed empty tables
    (["bench-moe", "--shapes", "default", "--expert-sizes", "7"], "none divides shape default's FFN width 512"),
    (["bench-moe", "--json", ""], "--json is empty"),                                     # silently wrote nothing
    (["bench-noise", "--load-procs", "100000"], "--load-procs must be in 1..256"),
    (["sweep", "tau", "--dry-run", "--cpus-per-trial", "nan"], "--cpus-per-trial must be a finite number >= 0"),
    (["sweep", "tau", "--dry-run", "--status-every", "inf"], "--status-every must be a finite number of seconds"),
    (["sweep", "tau", "--dry-run", "--set", "measure.warmup_batches=99999999"],
     "measure.warmup_batches must be in 0..1000"),
])
def test_cli_refuses_in_one_line_what_used_to_crash_or_run_forever(args, msg, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    code, out, err = _cli(args + (["--results", tmp_path / "res"] if args[0] in ("run", "sweep") and
                                  "--results" not in args else []), capsys)
    assert code == 2 and msg in err and err.count("\n") == 0, err
    assert os.listdir(tmp_path) == []                               # nothing written, not even the cache


def test_sweep_file_that_is_not_text_or_not_readable_is_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(b"\xff\xfe\x00name: x\n")
    code, _, err = _cli(["sweep", bad, "--dry-run", "--results", tmp_path / "res"], capsys)
    assert code == 2 and "not UTF-8 text" in err and err.count("\n") == 0, err
    if os.path.isfile("/proc/self/mem"):                           # a file whose reading fails (EIO)
        code, _, err = _cli(["sweep", "/proc/self/mem", "--dry-run", "--results", tmp_path / "res"], capsys)
        assert code == 2 and "sweep file /proc/self/mem cannot be read" in err and err.count("\n") == 0, err


def test_manifests_of_the_wrong_shape_are_skipped_with_a_warning(tmp_path, caplog):
    """A manifest that is JSON but not a manifest ([1, 2]; trials: 5) used to crash resume and report."""
    from bench.sweep.store import manifest_dir, read_manifests
    d = manifest_dir(str(tmp_path))
    os.makedirs(d)
    for name, body in (("list.json", [1, 2]), ("ints.json", {"sweep_id": "x", "spec": {}, "trials": 5})):
        with open(os.path.join(d, name), "w") as f:
            json.dump(body, f)
    assert read_manifests(str(tmp_path)) == []
    assert "skipping sweep manifest list.json: not a manifest" in caplog.text
    r = run_cli("report", "--results", tmp_path, "--out", tmp_path / "out")
    assert r.returncode in (0, 2) and "Traceback" not in r.stderr, r.stderr


def test_sweep_cache_dir_that_is_a_file_is_refused_before_the_manifest(tmp_path, capsys):
    f = tmp_path / "a-file"
    f.write_text("x")
    code, _, err = _cli(["sweep", "tau", "--dry-run", "--results", tmp_path / "res", "--set",
                         f"measure.cache_dir={f}"], capsys)
    assert code == 2 and "cache directory" in err and "is not a directory" in err, err
    assert not (tmp_path / "res").exists()


def test_a_broken_classifier_or_reference_is_refused_before_generating(tiny, tmp_path, capsys, monkeypatch):
    """A corrupt classifier file and published statistics with a NaN used to be found after the generation, which
    left batch checkpoints in the cache; now nothing is generated or written."""
    import numpy as np
    monkeypatch.setenv("VARBENCH_CACHE", str(tmp_path / "cache"))
    bad_cls = tmp_path / "cls.safetensors"
    bad_cls.write_bytes(b"not a safetensors file")
    mu, sigma = np.zeros(128), np.eye(128)
    mu[3] = np.nan
    npz = tmp_path / "ref.npz"
    np.savez(npz, mu=mu, sigma=sigma)
    common = ["run", "--model", "tiny", "--samples", "2", "--batch-size", "2", "--metrics", "fid",
              "--results", tmp_path / "res"]
    code, _, err = _cli(common + ["--classifier", bad_cls], capsys)
    assert code == 2 and "quality classifier" in err and err.count("\n") == 0, err
    code, _, err = _cli(common + ["--reference", npz], capsys)
    assert code == 2 and "non-finite" in err and err.count("\n") == 0, err
    assert not (tmp_path / "cache").exists() and not (tmp_path / "res").exists()


def test_model_and_checkpoints_together_are_refused(tmp_path, capsys, monkeypatch):
    """--model used to be ignored without a word when checkpoints were given (or set in the environment)."""
    code, _, err = _cli(["sample", "--model", "shapes-d6", "--var-ckpt", "v.pth", "--vae-ckpt", "a.pth",
                         "--classes", "0", "--out", tmp_path / "x.png"], capsys)
    assert code == 2 and "--model shapes-d6 and --var-ckpt / --vae-ckpt name two models" in err, err
    monkeypatch.setenv("VARBENCH_VAR_CKPT", "v.pth")
    code, _, err = _cli(["run", "--model", "tiny", "--results", tmp_path / "res"], capsys)
    assert code == 2 and "--model tiny and VARBENCH_VAR_CKPT name two models" in err, err
    assert os.listdir(tmp_path) == []


def test_results_of_an_unknown_sweep_is_an_error_not_an_empty_table(tmp_path, capsys):
    from bench.results import append_row
    append_row(str(tmp_path), {"run_id": "r1", "sweep": "tau", "method": "dense", "started_at": "2026-11-30"})
    code, _, err = _cli(["results", "show", "--results", tmp_path, "--sweep", "nosuch"], capsys)
    assert code == 2 and "no rows of sweep 'nosuch'" in err and "valid: tau" in err, err
    code, out, _ = _cli(["results", "show", "--results", tmp_path, "--sweep", "tau"], capsys)
    assert code == 0 and "1 rows" in out


def test_a_setting_given_twice_is_refused(tmp_path, capsys):
    """--set tau=0.8 --set tau=0.7 used to keep the last one without a word."""
    code, _, err = _cli(["run", "--method", "dmoe", "--set", "tau=0.8", "--set", "tau=0.7",
                         "--results", tmp_path / "res"], capsys)
    assert code == 2 and "tau given twice ('0.8', then '0.7'); give it once" in err, err
    code, _, err = _cli(["sweep", "tau", "--dry-run", "--results", tmp_path / "res", "--set", "models=tiny",
                         "--model", "default"], capsys)
    assert code == 2 and "--set models given twice" in err, err
    assert os.listdir(tmp_path) == []

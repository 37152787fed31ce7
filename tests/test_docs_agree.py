"""The docs agree with the code they describe: the README's Layout names the modules there are, and the defaults
the README and docs/reliability.md restate by hand are the settings' own, the reply fields docs/api.md lists the
reply models'."""

from __future__ import annotations

import json
import re
from pathlib import Path

import yaml

from tests.helpers import DOC_UNITS, load_script, named_values

REPO = Path(__file__).resolve().parent.parent


def _layout_entry(folder: str) -> tuple[set[str], set[str]]:
    """The README Layout block's entry for `folder` (its line and the indented ones after it): every word, and
    the names it lists as modules (after the first colon, outside parentheses, which hold prose)."""
    text = (REPO / "README.md").read_text()
    block = text[text.index("## Layout") :]
    block = block[block.index("```") + 3 :]
    lines = block[: block.index("```")].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{folder}/"))
    entry = [lines[start]]
    for line in lines[start + 1 :]:
        if not line.startswith(" "):
            break
        entry.append(line)
    text = " ".join(entry)
    listed = re.sub(r"\([^()]*\)", "", text.split(":", 1)[1])
    return set(re.findall(r"[a-z_]+", text)), set(re.findall(r"[a-z_]+", listed)) - {"proto"}


def _modules(folder: Path) -> set[str]:
    generated = {"rorem_pb2", "rorem_pb2_grpc"}  # named as "rorem.proto (+ stubs)"
    return {p.stem for p in folder.glob("*.py") if not p.stem.startswith("_") and p.stem not in generated} | {
        p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("_")
    }


def test_the_layout_names_every_module_of_engines_and_serve_and_none_that_is_gone():
    """A renamed or split module left it naming files that were gone (serve/remover, requests, feedback, gate)
    and leaving out a dozen that exist."""
    for folder in ("engines", "serve"):
        (words, listed), present = _layout_entry(folder), _modules(REPO / folder)
        present |= {"rorem"} if folder == "serve" else set()  # rorem.proto
        assert present - words == set(), f"README Layout: {folder}/ leaves out {sorted(present - words)}"
        assert listed - present == set(), f"README Layout: {folder}/ names what is not there: {sorted(listed - present)}"


def test_the_layout_names_every_loadtests_script():
    """Six scripts (bench_region_crops, bench_ingress, bench_open_loop, ...) were missing from it."""
    words, _ = _layout_entry("loadtests")
    present = _modules(REPO / "loadtests")
    assert present - words == set(), f"README Layout: loadtests/ leaves out {sorted(present - words)}"


_UNITS = DOC_UNITS


def _default(path: str):
    from serve.config import AppSettings

    value = AppSettings()
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _says(cell: str) -> object:
    """A table's default as written: `30 MiB` -> bytes, `20 s` -> 20, `none` -> None, else the word."""
    cell = cell.strip().strip("`")
    number = re.fullmatch(r"(\d+(?:\.\d+)?) ?(KiB|MiB|GiB|s|)", cell)
    if number:
        return float(number[1]) * _UNITS[number[2]]
    return {"none": None, "false": False, "true": True}.get(cell, cell)


def _agrees(written: object, default: object) -> bool:
    if isinstance(written, float) and not isinstance(default, bool) and isinstance(default, int | float):
        return written == default
    return written == (default.value if hasattr(default, "value") else default)


def _default_rows(path: Path) -> list[tuple[str, str, str]]:
    """(settings key, default as written, the row) for each table row whose first cell names settings keys:
    `a.b`, or `a.b` / `c` (c beside b) / `c.d`, with the defaults "x / y" in the second cell."""
    rows = []
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 3 or not re.match(r"`[a-z_][a-z_.]*`", cells[0]):
            continue
        keys = re.findall(r"`([a-z_][a-z_.]*)`", cells[0].split("(")[0])
        values = cells[1].split(" / ")
        if len(keys) != len(values):
            continue
        parent = keys[0].rsplit(".", 1)[0] + "." if "." in keys[0] else ""
        for key, value in zip(keys, values, strict=True):
            rows.append((key if "." in key else parent + key, value, line))
    return rows


def test_the_defaults_the_readme_and_the_limits_table_restate_are_the_settings_defaults():
    """docs/configuration.md is generated; the README's knob table and docs/reliability.md's limits restate
    defaults by hand, and changing one in serve/config.py left them stale with the suite green."""
    checked = 0
    for doc in (REPO / "README.md", REPO / "docs" / "reliability.md"):
        for key, written, row in _default_rows(doc):
            assert _agrees(_says(written), _default(key)), f"{doc.name}: {key} is {_default(key)!r}, not {written!r}: {row}"
            checked += 1
    assert checked >= 29, f"only {checked} restated defaults found: has a table's format changed?"


def test_the_proxy_connection_limits_docs_reliability_states_are_the_modules():
    """The head's size and time, the lingering close's time and bytes and the send timeout are module constants,
    restated by hand in the limits table."""
    from serve import proxy_connections as limits

    rows = (REPO / "docs" / "reliability.md").read_text().splitlines()
    head = next(row for row in rows if row.startswith("| a request's line and headers"))
    linger = next(row for row in rows if row.startswith("| what a client still sends after the proxy has answered"))
    said = head.split(" | ")[1]
    assert f"{limits.MAX_HEAD_BYTES // 1024} KiB, within {limits.HEAD_TIMEOUT_S:g} s" in said, said
    said = linger.split(" | ")[1]
    assert said.startswith(f"{limits.LINGER_S:g} s in all (`LINGER_S`") and "(`LINGER_MAX_BYTES`)" in said, said
    assert f"{limits.LINGER_MAX_BYTES // 2**20} MiB more (`LINGER_MAX_BYTES`)" in said, said
    send = next(row for row in rows if row.startswith("| a client that does not read its answer"))
    assert send.split(" | ")[1].startswith(f"{limits.SEND_TIMEOUT_S:g} s in which"), send
    assert "trailer fields are dropped" in head and f"431 past {limits.MAX_HEAD_BYTES // 1024} KiB" in head


def test_the_bad_input_case_count_the_readme_and_api_doc_give_is_the_corpus_table_s():
    """The README said 93 cases, docs/api.md 92; the table in docs/reliability.md is the corpus (a test keeps it so)."""
    text = (REPO / "docs" / "reliability.md").read_text()
    table = text[text.index("| case | REST answer | gRPC answer |") :].split("\n\n", 1)[0]
    cases = len(table.splitlines()) - 2
    for doc in (REPO / "README.md", REPO / "docs" / "api.md"):
        said = re.findall(r"(\d+) (?:bad-input )?cases", (doc).read_text())
        assert said and all(int(n) == cases for n in said), f"{doc.name} says {said}; the corpus has {cases}"


def test_the_docs_say_the_default_output_format_as_negotiation_applies_it():
    """They said "the input's format", and a GIF, BMP or TIFF upload came back as PNG."""
    from serve import negotiation

    for name in ("README.md", "docs/api.md", "serve/rorem.proto"):
        text = " ".join((REPO / name).read_text().replace("//", " ").split())
        assert negotiation.DEFAULT in text, name
        assert not re.search(r"else the input's format(?! if)|empty: the input's format(?! if)", text), name


def test_the_api_doc_lists_the_json_replies_fields_as_the_models_have_them():
    """docs/api.md restates /remove's JSON reply and shows /score's; the routes build both with the OpenAPI models."""
    from serve.openapi import RemoveReply, ScoreReply

    text = (REPO / "docs" / "api.md").read_text()
    remove = re.search(r'`\{"image": "<base64>"[^`]*\}`', text)[0]
    assert re.findall(r'"([a-z_]+)"', remove) == list(RemoveReply.model_fields)
    score = re.search(r"curl [^\n]*/score\n# (\{.*\})", text)[1]
    assert list(json.loads(score)) == list(ScoreReply.model_fields)


def test_loadtests_readme_names_every_knob_the_locustfile_reads():
    """loadtests/README.md's list of locust knobs left out ROREM_GRPC_APPLICATION, which a cluster of several
    applications needs, though the locustfile's docstring and docs/operations.md named it."""
    locustfile = (REPO / "loadtests" / "locustfile.py").read_text()
    knobs = set(re.findall(r"\bROREM_[A-Z_]+\b", locustfile.split('"""')[1]))
    assert {"ROREM_GRPC_APPLICATION", "ROREM_API_KEY"} <= knobs
    locust_section = (REPO / "loadtests" / "README.md").read_text().split("## Locust", 1)[1]
    assert knobs - set(re.findall(r"\bROREM_[A-Z_]+\b", locust_section)) == set()


def test_the_documented_headless_locust_commands_wait_out_the_requests_running_at_their_end(monkeypatch):
    """The documented `locust --headless -t 2m` commands had no --stop-timeout: the requests still running when -t
    ended were killed and vanished from the figures, the slowest ones, so the percentiles read low. Each needs a
    --stop-timeout longer than a request may take (ROREM_TIMEOUT_S's default), as bench_vs_naive's run has."""
    benchlib = load_script("loadtests/benchlib.py")
    sources = [REPO / "loadtests" / "README.md", REPO / "loadtests" / "locustfile.py", *(REPO / "docs").glob("*.md")]
    commands = []
    for source in sources:
        text = re.sub(r"\\+\n", " ", source.read_text())  # a command's continued lines, in a docstring too
        commands += [(source.name, line) for line in text.splitlines() if re.search(r"locust -f .* -t \d", line)]
    assert {"README.md", "locustfile.py", "operations.md"} <= {name for name, _ in commands}, commands
    for name, command in commands:
        stop = re.search(r"--stop-timeout (\d+)", command)
        assert stop and int(stop[1]) > benchlib.DEFAULT_TIMEOUT_S, f"{name}: {command}"
    monkeypatch.delenv(benchlib.TIMEOUT_ENV, raising=False)  # the default's, whatever the shell sets
    assert benchlib.locust_stop_timeout_s() > benchlib.DEFAULT_TIMEOUT_S


LOCAL_YAML = yaml.safe_load((REPO / "serve" / "configs" / "local.yaml").read_text())
_FIGURE = r"\d+(?:\.\d+)? ?(?:KiB|MiB|GiB|MB|s)(?: \+ \d+ ?(?:KiB|MiB))?"


def _figure(text: str) -> tuple[float, float]:
    """A figure as the docs write it, and how far from it the exact value may be: `40 MiB + 64 KiB` is exact,
    `201 MB` is rounded to the MB."""
    terms = [re.fullmatch(r"(\d+(?:\.\d+)?) ?(KiB|MiB|GiB|MB|s)", term) for term in text.split(" + ")]
    return sum(float(t[1]) * _UNITS[t[2]] for t in terms), 0.5e6 if text.endswith("MB") else 0


def _assert_says(said: str, value: float, where: str) -> None:
    written, rounding = _figure(said)
    assert abs(written - value) <= rounding, f"{where} says {said}; the value is {value:,}"


def test_the_limits_at_the_proxies_table_gives_proxy_env_s_figures_for_local_yaml():
    """It said the HTTP body limit was 40 MiB; proxy_env makes it 40 MiB + 64 KiB (42,008,576 bytes)."""
    from serve import proxy_limits

    env = proxy_limits.proxy_env(LOCAL_YAML)
    (route,) = json.loads(env[proxy_limits.ROUTES_ENV]).values()
    expected = {
        f"`{proxy_limits.GRPC_MESSAGE_ENV}`": float(env[proxy_limits.GRPC_MESSAGE_ENV]),
        f"`{proxy_limits.MAX_REQUEST_ENV}`": float(env[proxy_limits.MAX_REQUEST_ENV]),
        f"`{proxy_limits.ROUTES_ENV}` `limit`": route["limit"],
        f"`{proxy_limits.ROUTES_ENV}` `timeout_s`": route["timeout_s"],
        f"`{proxy_limits.ROUTES_ENV}` `max_held`": route["max_held"],
        f"`{proxy_limits.PROXY_DRAINING_ENV}`": float(env[proxy_limits.PROXY_DRAINING_ENV]),
        f"`{proxy_limits.NODE_DRAIN_ENV}`": float(env[proxy_limits.NODE_DRAIN_ENV]),
    }
    text = (REPO / "docs" / "reliability.md").read_text()
    table = text[text.index("| proxy | setting | value") :].split("\n\n", 1)[0]
    checked = set()
    for row in table.splitlines()[2:]:
        setting, value = row.split(" | ")[1:3]
        key = next((key for key in expected if setting.startswith(key)), None)
        if key:
            _assert_says(re.search(rf"= ({_FIGURE})", value)[1], expected[key], f"reliability.md {key}")
            checked.add(key)
    assert checked == set(expected), f"rows not found: {set(expected) - checked}"
    assert f"max({proxy_limits.RAY_PROXY_DRAINING_S:g} s," in table
    body_limit = " ".join(text.split()).split("per proxy) x ")[1]
    _assert_says(re.match(_FIGURE, body_limit)[0], route["limit"], "reliability.md's bodies Ray's proxy keeps")
    for doc in ("api.md", "reliability.md"):
        said = re.findall(rf"({_FIGURE}) with the defaults", " ".join((REPO / "docs" / doc).read_text().split()))
        assert said, doc
        for figure in said:
            _assert_says(figure, float(env[proxy_limits.GRPC_MESSAGE_ENV]), f"{doc}'s gRPC message limit")


def test_the_proxies_request_timeout_the_docs_give_is_local_yaml_s():
    """180 s (http_options / grpc_options `request_timeout_s`) was restated in three docs, by hand."""
    proxy_s = LOCAL_YAML["http_options"]["request_timeout_s"]
    assert LOCAL_YAML["grpc_options"]["request_timeout_s"] == proxy_s
    api = " ".join((REPO / "docs" / "api.md").read_text().split())
    assert f"Serve's own `request_timeout_s`, {proxy_s:g} s," in api
    reliability = " ".join((REPO / "docs" / "reliability.md").read_text().split())
    row = reliability.split("| Ray Serve `http_options.request_timeout_s`")[1].split(" |\n")[0]
    assert f"`grpc_options.request_timeout_s`, also {proxy_s:g} s:" in row
    assert row.split(" | ")[1] == f"{proxy_s:g} s", row


def _queue(app: dict, deployment: str) -> str:
    (settings,) = [d for d in app["deployments"] if d["name"] == deployment]
    return f"{settings['max_ongoing_requests']} + {settings['max_queued_requests']}"


def test_the_serve_queue_sizes_the_docs_give_are_local_yaml_s():
    """Remover / Scorer 16 + 64 and Ingress 64 + 256 were restated by hand; the settings-table check skips them."""
    (app,) = LOCAL_YAML["applications"]
    text = (REPO / "docs" / "reliability.md").read_text()
    models = next(r for r in text.splitlines() if r.startswith("| Remover / Scorer `max_ongoing_requests` + "))
    assert _queue(app, "Remover") == _queue(app, "Scorer")
    assert models.split(" | ")[1] == f"{_queue(app, 'Remover')} each", models
    ingress = next(r for r in text.splitlines() if r.startswith("| Ingress `max_ongoing_requests` + "))
    assert ingress.split(" | ")[1] == _queue(app, "Ingress"), ingress
    prose = " ".join(text.split())
    assert f"`max_queued_requests`, {_queue(app, 'Ingress')} per proxy in `local.yaml`" in prose


def _named_constants() -> dict[str, object]:
    """The module constants the docs name beside their values (`NAME` (value) or value (`NAME`)), by the name the
    docs write: bare, or with its module's where two modules use it."""
    from engines import regions
    from serve import admission, cli, config, grpc_client, health, problems, proxy_connections, proxy_middleware, quotas
    from serve.retention import store

    named = {
        "quotas.CALL_TIMEOUT_S": quotas.CALL_TIMEOUT_S,
        "STOP_BUDGET_S": cli.STOP_BUDGET_S,
        "DRAIN_GRACE_S": proxy_middleware.DRAIN_GRACE_S,
        **{name: getattr(admission, name) for name in ("STALL_FACTOR", "RATE_WINDOW", "SAME_BATCH_S")},
        **{name: getattr(quotas, name) for name in ("LEASE_MARGIN_S", "CONCURRENCY_REFUSAL_HOLD_S")},
        **{name: getattr(grpc_client, name) for name in ("SERVICE_SLACK_S", "DEFAULT_DEADLINE_S")},
        "MAX_CROPS": regions.MAX_CROPS,
        **{name: getattr(problems, name) for name in ("MAX_DETAIL_CHARS", "MAX_TEXT_CHARS", "MAX_LISTED")},
        "MAX_VERDICTS": store.MAX_VERDICTS,
        **{
            name: getattr(health, name)
            for name in ("FAILED_CALLS_UNHEALTHY", "DESCRIBE_TIMEOUT_S", "STALE_AFTER_S", "STALE_READ_WAIT_S",
                         "READYZ_MAX_WAIT_S")  # fmt: skip
        },
        **{name: getattr(proxy_connections, name) for name in ("LINGER_S", "LINGER_MAX_BYTES")},
        "MAX_RETRY_AFTER_S": config.MAX_RETRY_AFTER_S,
    }
    return named


def _value_of(name: str, constants: dict[str, object]) -> tuple[str, object]:
    """(constant, its value) for a name as written (it may name the constant's modules too), else (the settings key,
    its default) for a settings key, else (name, None)."""
    parts = name.split(".")
    for start in range(len(parts)):  # `serve.config.MAX_RETRY_AFTER_S` is MAX_RETRY_AFTER_S
        if ".".join(parts[start:]) in constants:
            return ".".join(parts[start:]), constants[".".join(parts[start:])]
    try:
        value = _default(name)
    except AttributeError:
        return name, None
    return name, value if isinstance(value, int | float) and not isinstance(value, bool) else None


def test_every_value_the_docs_write_beside_a_constant_or_setting_is_its_own():
    """The docs restated constants in prose (`STOP_BUDGET_S`'s 9 s, `DRAIN_GRACE_S`'s 4 s, the quota ledger's 2 s,
    problems.py's caps) with nothing to say when the code changed; a value written beside its name is checked here.
    docs/benchmarks.md is left out: it records what was measured then."""
    constants = _named_constants()
    named = set()
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if doc.name == "benchmarks.md":
            continue
        for name, written, passage in named_values(doc.read_text()):
            key, value = _value_of(name, constants)
            if value is not None:
                assert written == value, f"{doc.name}: {key} is {value!r}: {passage!r}"
                named.add(key)
    assert set(constants) - named == set(), f"never written beside its value: {sorted(set(constants) - named)}"


def _bounds(annotated) -> tuple[float, float]:
    (field,) = [m for m in annotated.__metadata__ if hasattr(m, "metadata")]
    bounds = {type(m).__name__: getattr(m, "ge", getattr(m, "le", None)) for m in field.metadata}
    return bounds.get("Ge"), bounds["Le"]


def test_the_request_option_ranges_api_md_gives_are_the_models():
    """`max_attempts` 1-8 and `timeout_s` at most 3600 are the request model's bounds, restated in the options table."""
    from serve.config import Attempts, Dilation, GateThreshold
    from serve.protocol import TimeoutS

    text = (REPO / "docs" / "api.md").read_text()
    least, most = _bounds(Attempts)
    assert f"| `max_attempts` | attempts for `retry` / `reject`, {least}-{most} (default" in text
    assert f"one above {_bounds(TimeoutS)[1]:g} is refused (422)" in text
    assert "| `dilate` | mask dilation in pixels, {:g}-{:g} (default".format(*_bounds(Dilation)) in text
    assert "| `gate_threshold` | passing discriminator score, {:g}-{:g} (default".format(*_bounds(GateThreshold)) in text


def test_the_loopback_ports_the_docs_give_are_the_served_ones():
    """The docs name 127.0.0.1:8000, :9000 and :9464 by hand: the HTTP and gRPC ports of local.yaml, and the CLI's
    metrics port (serve.cli.DEFAULT_METRICS_PORT), the one every `/metrics` URL and scrape target gives."""
    from serve.cli import DEFAULT_METRICS_PORT
    from serve.ports import DEFAULT_GRPC_PORT, DEFAULT_HTTP_PORT

    ports = (LOCAL_YAML["http_options"]["port"], LOCAL_YAML["grpc_options"]["port"])
    assert ports == (DEFAULT_HTTP_PORT, DEFAULT_GRPC_PORT), "the clients' and load tests' defaults reach local.yaml"
    served = {*ports, DEFAULT_METRICS_PORT}
    said, metrics = set(), []
    for doc in [REPO / "README.md", REPO / "loadtests" / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if doc.name == "benchmarks.md":
            continue
        text = doc.read_text()
        said |= {int(port) for port in re.findall(r"(?:127\.0\.0\.1|localhost):(\d+)", text)}
        metrics += [int(port) for port in re.findall(r'127\.0\.0\.1:(\d+)(?:/metrics|"\])', text)]
    assert said == served, f"the docs give {sorted(said)}; served: {sorted(served)}"
    assert len(metrics) >= 3 and set(metrics) == {DEFAULT_METRICS_PORT}, metrics


def test_the_commands_that_send_a_photo_with_its_mask_send_the_photo_the_readmes_snippet_writes():
    """The README's snippet writes photo.jpg (and mask.png); docs/configuration.md's commands sent photo.png, a file
    no step of the docs had written."""
    written = re.search(r"photo\.save\('([^']+)'\)", (REPO / "README.md").read_text())[1]
    sent = []
    for doc in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        for line in doc.read_text().splitlines():
            if "mask.png" in line and ("curl " in line or "serve.grpc_client " in line):
                sent += [(doc.name, name) for name in re.findall(r"(?:=@|\s)(photo\.[a-z]+)\b", line)]
    assert len(sent) >= 8, f"only {sent}: has the docs' wording changed?"
    assert {name for _, name in sent} == {written}, [pair for pair in sent if pair[1] != written]


def test_evaluation_md_names_every_measure_the_shipped_gate_sets():
    """The snippet was called "the shipped gate" while it showed 3 of the file's 11 measures (the training trial)."""
    gate = yaml.safe_load((REPO / "training" / "configs" / "eval_thresholds.yaml").read_text())
    text = (REPO / "docs" / "evaluation.md").read_text()
    section = text[text.index("is the shipped gate") : text.index("The gate uses the mean delta")]
    assert f"of its {len(gate['allowed_deltas'])} measures" in section
    assert [name for name in gate["allowed_deltas"] if not re.search(rf"\b{name}\b", section)] == []


def test_api_md_gives_the_multipart_padding_bound_the_parser_holds():
    from serve.uploads import MAX_TRANSPORT_PADDING

    api = (REPO / "docs" / "api.md").read_text()
    assert f"followed by more than {MAX_TRANSPORT_PADDING} spaces or tabs" in api

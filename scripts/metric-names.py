#!/usr/bin/env python3
"""Lists the metric and label names the dashboard and the alert rules use.

    python3 scripts/metric-names.py [--dashboard FILE] [--rules FILE]...

Reads every `expr` of deploy/grafana/dashboards/confroll.json (panel targets,
and the `label_values(...)` queries of the template variables) and of
deploy/prometheus/alerts.yml, parses them as PromQL and prints, on stdout:

    metric <name>            every metric name a selector uses; histogram
                             series (`_bucket`, `_sum`, `_count`) are given
                             as the histogram's base name
    label <metric> <label>   every label the queries rely on for that metric:
                             in its selector's matchers, in by()/without()
                             of an aggregation over it, in on()/ignoring()/
                             group_left()/group_right() of a binary operation
                             it takes part in, and the label of label_values()

sorted, each metric followed by its labels. Compare it with a live /metrics:
every name printed should be exported there (`le` is the label of the
`_bucket` series).

Names that Prometheus adds and no /metrics exports (the `up` series; the
target labels `job`, `instance` and the Kubernetes ones the scrape configs
set) are used too; they are reported on stderr as lines starting with `#`,
not on stdout.

Standard library only: the rules file is read with a small reader of the
YAML forms `expr:` takes there (plain, quoted, or a `|`/`>` block).
"""

import argparse
import json
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DASHBOARD = os.path.join(ROOT, "deploy", "grafana", "dashboards", "confroll.json")
DEFAULT_RULES = [os.path.join(ROOT, "deploy", "prometheus", "alerts.yml")]

# Added by Prometheus at scrape time, never in a target's /metrics.
TARGET_METRICS = {"up", "scrape_duration_seconds", "scrape_samples_scraped",
                  "scrape_samples_post_metric_relabeling", "scrape_series_added", "ALERTS", "ALERTS_FOR_STATE"}
TARGET_LABELS = {"job", "instance", "namespace", "pod"}

AGGREGATORS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count", "count_values",
               "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
# Binary operators and their precedence (higher binds tighter).
BINARY = {"or": 1, "and": 2, "unless": 2,
          "==": 3, "!=": 3, "<=": 3, "<": 3, ">=": 3, ">": 3,
          "+": 4, "-": 4, "*": 5, "/": 5, "%": 5, "atan2": 5, "^": 6}
HISTOGRAM_SUFFIX = re.compile(r"_(bucket|sum|count)$")

TOKEN = re.compile(r"""
    (?P<ws>\s+|\#[^\n]*)
  | (?P<string>"(?:[^"\\]|\\.)*"|'(?:[^'\\]|\\.)*'|`[^`]*`)
  | (?P<number>(?:[0-9]|\.[0-9])[0-9a-zA-Z_.]*)
  | (?P<ident>[a-zA-Z_:][a-zA-Z0-9_:]*)
  | (?P<op>==|!=|<=|>=|=~|!~|[-+*/%^<>=@{}()\[\],:])
""", re.VERBOSE)


class ParseError(Exception):
    pass


def grafana_vars(expr):
    """Replaces Grafana's interval variables outside strings by a duration."""
    out, i = [], 0
    for m in re.finditer(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', expr):
        out.append(re.sub(r"\$\{?__\w+\}?|\$\{?\w+\}?", "5m", expr[i:m.start()]))
        out.append(m.group(0))
        i = m.end()
    out.append(re.sub(r"\$\{?__\w+\}?|\$\{?\w+\}?", "5m", expr[i:]))
    return "".join(out)


def tokenize(expr):
    toks, pos = [], 0
    while pos < len(expr):
        m = TOKEN.match(expr, pos)
        if not m:
            raise ParseError(f"unexpected {expr[pos:pos + 20]!r}")
        pos = m.end()
        kind = m.lastgroup
        if kind == "ws":
            continue
        text = m.group(0)
        if kind == "ident" and text.lower() in ("inf", "nan"):
            kind = "number"
        toks.append((kind, text))
    toks.append(("eof", ""))
    return toks


class Parser:
    """Just enough of PromQL to know which metric each label applies to.

    Every parse method returns the set of (normalised) metric names in the
    sub-expression it read; labels are recorded in `uses` as they are met.
    """

    def __init__(self, expr, uses):
        self.toks = tokenize(expr)
        self.i = 0
        self.uses = uses

    def peek(self, k=0):
        return self.toks[self.i + k]

    def take(self, text=None):
        tok = self.toks[self.i]
        if text is not None and tok[1] != text:
            raise ParseError(f"expected {text!r}, got {tok[1]!r}")
        self.i += 1
        return tok

    def record(self, metrics, labels):
        for m in metrics:
            self.uses.setdefault(m, set()).update(l for l in labels if l != "__name__")

    def parse(self):
        metrics = self.expr(0)
        if self.peek()[0] != "eof":
            raise ParseError(f"unexpected {self.peek()[1]!r}")
        return metrics

    def expr(self, min_prec):
        left = self.unary()
        while True:
            kind, text = self.peek()
            op = text.lower() if kind == "ident" else text
            if kind not in ("ident", "op") or op not in BINARY or BINARY[op] < min_prec:
                return left
            prec = BINARY[op]
            self.take()
            if self.peek()[1] == "bool":
                self.take()
            both, left_only, right_only = [], [], []
            if self.peek()[1] in ("on", "ignoring"):
                self.take()
                both = self.label_list()
            if self.peek()[1] in ("group_left", "group_right"):
                side = self.take()[1]
                extra = self.label_list() if self.peek()[1] == "(" else []
                # The extra labels come from the "one" side.
                if side == "group_left":
                    right_only = extra
                else:
                    left_only = extra
            right = self.expr(prec if op == "^" else prec + 1)
            self.record(left | right, both)
            self.record(left, left_only)
            self.record(right, right_only)
            left = left | right

    def unary(self):
        if self.peek()[1] in ("-", "+"):
            self.take()
            return self.unary()
        return self.postfix(self.primary())

    def postfix(self, metrics):
        while True:
            text = self.peek()[1]
            if text == "[":
                while self.take()[1] != "]":
                    if self.peek()[0] == "eof":
                        raise ParseError("unclosed [")
            elif text == "offset":
                self.take()
                if self.peek()[1] == "-":
                    self.take()
                self.take()
            elif text == "@":
                self.take()
                if self.peek()[0] == "ident":
                    self.take()
                    self.take("(")
                    self.take(")")
                else:
                    self.take()
            else:
                return metrics

    def primary(self):
        kind, text = self.peek()
        if text == "(":
            self.take()
            metrics = self.expr(0)
            self.take(")")
            return metrics
        if kind in ("number", "string"):
            self.take()
            return set()
        if text == "{":
            labels, name = self.matchers()
            metrics = {normalise(name)} if name else set()
            self.record(metrics, labels)
            return metrics
        if kind != "ident":
            raise ParseError(f"unexpected {text!r}")
        self.take()
        nxt = self.peek()[1]
        if text in AGGREGATORS and nxt in ("(", "by", "without"):
            grouping = []
            if nxt in ("by", "without"):
                self.take()
                grouping = self.label_list()
            metrics = self.args()
            if self.peek()[1] in ("by", "without"):
                self.take()
                grouping = self.label_list()
            self.record(metrics, grouping)
            return metrics
        if nxt == "(":
            return self.args()
        metrics = {normalise(text)}
        self.uses.setdefault(normalise(text), set())
        if nxt == "{":
            labels, _ = self.matchers()
            self.record(metrics, labels)
        return metrics

    def args(self):
        self.take("(")
        metrics = set()
        if self.peek()[1] != ")":
            while True:
                metrics |= self.expr(0)
                if self.peek()[1] != ",":
                    break
                self.take()
        self.take(")")
        return metrics

    def label_list(self):
        self.take("(")
        labels = []
        while self.peek()[1] != ")":
            kind, text = self.take()
            if kind == "ident":
                labels.append(text)
            elif kind == "string":
                labels.append(text[1:-1])
            elif text != ",":
                raise ParseError(f"unexpected {text!r} in a label list")
        self.take(")")
        return labels

    def matchers(self):
        self.take("{")
        labels, name = [], None
        while self.peek()[1] != "}":
            kind, text = self.take()
            if text == ",":
                continue
            if kind not in ("ident", "string"):
                raise ParseError(f"unexpected {text!r} in a selector")
            label = text if kind == "ident" else text[1:-1]
            op = self.take()[1]
            if op not in ("=", "!=", "=~", "!~"):
                raise ParseError(f"unexpected {op!r} in a selector")
            value = self.take()
            if value[0] != "string":
                raise ParseError(f"expected a string after {label}{op}")
            if label == "__name__" and op == "=":
                name = value[1][1:-1]
            labels.append(label)
        self.take("}")
        return labels, name


def normalise(name):
    return HISTOGRAM_SUFFIX.sub("", name)


def dashboard_exprs(path):
    with open(path) as f:
        dash = json.load(f)
    exprs = []

    def panels(ps):
        for p in ps:
            for t in p.get("targets", []):
                if t.get("expr"):
                    exprs.append((f"{path}: panel {p.get('title')!r} {t.get('refId')}", t["expr"]))
            panels(p.get("panels", []))

    panels(dash.get("panels", []))
    for v in dash.get("templating", {}).get("list", []):
        q = v.get("query")
        if isinstance(q, dict):
            q = q.get("query")
        if v.get("type") == "query" and isinstance(q, str) and q:
            exprs.append((f"{path}: variable {v.get('name')!r}", q))
    return exprs


def rules_exprs(path):
    """The `expr:` values of a rules file (plain, quoted or block scalars)."""
    with open(path) as f:
        lines = f.read().split("\n")
    exprs, i = [], 0
    while i < len(lines):
        m = re.match(r"^(\s*(?:-\s+)?)expr:\s*(.*?)\s*$", lines[i])
        i += 1
        if not m:
            continue
        key_col, value = len(m.group(1)), m.group(2)
        where = f"{path}:{i}"
        if re.match(r"^[|>][-+]?\d*(\s+#.*)?$", value):
            block = []
            while i < len(lines) and (not lines[i].strip() or len(lines[i]) - len(lines[i].lstrip()) > key_col):
                block.append(lines[i])
                i += 1
            exprs.append((where, "\n".join(block)))
        elif value.startswith('"'):
            exprs.append((where, json.loads(value)))
        elif value.startswith("'"):
            exprs.append((where, value[1:-1].replace("''", "'")))
        else:
            exprs.append((where, re.sub(r"\s+#.*$", "", value)))
    return exprs


def label_values_query(query, uses):
    """Grafana's `label_values(selector, label)`; True when `query` is one."""
    m = re.match(r"^\s*label_values\s*\((.*),\s*([a-zA-Z_][a-zA-Z0-9_]*)\s*\)\s*$", query, re.S)
    if not m:
        return False
    metrics = Parser(grafana_vars(m.group(1)), uses).parse()
    for name in metrics:
        uses[name].add(m.group(2))
    return True


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dashboard", action="append", help=f"Grafana dashboard JSON (default {DEFAULT_DASHBOARD})")
    ap.add_argument("--rules", action="append", help=f"Prometheus rules file (default {DEFAULT_RULES[0]})")
    args = ap.parse_args()

    exprs = []
    for path in args.dashboard or [DEFAULT_DASHBOARD]:
        exprs += dashboard_exprs(path)
    for path in args.rules or DEFAULT_RULES:
        exprs += rules_exprs(path)

    uses, failed = {}, False
    for where, expr in exprs:
        try:
            if not label_values_query(expr, uses):
                Parser(grafana_vars(expr), uses).parse()
        except (ParseError, IndexError) as e:
            print(f"{where}: cannot parse {expr!r}: {e}", file=sys.stderr)
            failed = True

    added = []
    for name in sorted(uses):
        if name in TARGET_METRICS:
            added.append(f"# added by Prometheus, not in /metrics: metric {name}")
            continue
        print(f"metric {name}")
        for label in sorted(uses[name]):
            if label in TARGET_LABELS:
                added.append(f"# added by Prometheus, not in /metrics: label {name} {label}")
            else:
                print(f"label {name} {label}")
    for line in added:
        print(line, file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

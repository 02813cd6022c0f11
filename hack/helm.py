#!/usr/bin/env python3
"""Helm's own Go SDK (helm-python-sdk, which bundles Helm v4) behind the few
`helm` verbs the project's scripts and tests use, for machines without a
`helm` binary (Debian ships none). On a machine with Helm, use `helm`: the
arguments are the same.

  helm.py lint CHART
  helm.py template NAME CHART [-n NS] [-f VALUES]... [--set K=V]...
  helm.py install NAME CHART -n NS [-f VALUES]... [--set K=V]... [--create-namespace] [--wait] [--timeout S]
  helm.py upgrade NAME CHART -n NS [-f VALUES]... [--set K=V]... [--wait] [--timeout S]
  helm.py uninstall NAME -n NS [--wait]
  helm.py status NAME -n NS

The cluster is the one of $KUBECONFIG (or --kubeconfig). Errors go to
stderr as Helm words them, and the exit status is 1.
"""

import argparse
import json
import sys

import helm_python as helm
import yaml


def merge(base, extra):
    """Helm's value merge: maps merge key by key, everything else replaces."""
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            merge(base[k], v)
        else:
            base[k] = v
    return base


def values(args):
    out = {}
    for f in args.values or []:
        with open(f) as fh:
            merge(out, yaml.safe_load(fh) or {})
    for s in args.set or []:
        merge(out, helm.parse_set_string(s))
    return out


def main():
    p = argparse.ArgumentParser(prog="helm.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--kubeconfig")
    sub = p.add_subparsers(dest="verb", required=True)
    lint = sub.add_parser("lint")
    lint.add_argument("chart")
    for verb in ("template", "install", "upgrade"):
        s = sub.add_parser(verb)
        s.add_argument("name")
        s.add_argument("chart")
        s.add_argument("-n", "--namespace", default="default")
        s.add_argument("-f", "--values", action="append")
        s.add_argument("--set", action="append")
        if verb != "template":
            s.add_argument("--wait", action="store_true")
            s.add_argument("--timeout", type=int, default=300)
        if verb == "install":
            s.add_argument("--create-namespace", action="store_true")
    for verb in ("uninstall", "status"):
        s = sub.add_parser(verb)
        s.add_argument("name")
        s.add_argument("-n", "--namespace", default="default")
        if verb == "uninstall":
            s.add_argument("--wait", action="store_true")
    args = p.parse_args()

    try:
        if args.verb == "lint":
            report = helm.lint(args.chart)
            for m in report.get("messages", []):
                level = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m.get("severity"), "?")
                print(f"[{level}] {m.get('path')}: {m.get('error')}")
            bad = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2] + report.get("errors", [])
            return 1 if bad else 0
        if args.verb == "template":
            with helm.Chart.load(args.chart) as chart:
                files = chart.render(values=values(args), name=args.name, namespace=args.namespace)
            for path in sorted(files):
                text = files[path].strip()
                if text and not path.endswith("NOTES.txt"):
                    print(f"---\n# Source: {path}\n{text}")
            return 0
        with helm.Config(kubeconfig_path=args.kubeconfig, namespace=args.namespace) as cfg:
            wait = "watcher" if getattr(args, "wait", False) else None
            if args.verb == "install":
                r = cfg.install(args.chart, args.name, values(args), namespace=args.namespace,
                                wait=wait, timeout=args.timeout, create_namespace=args.create_namespace)
            elif args.verb == "upgrade":
                r = cfg.upgrade(args.chart, args.name, values(args), namespace=args.namespace,
                                wait=wait, timeout=args.timeout)
            elif args.verb == "uninstall":
                r = cfg.uninstall(args.name, wait=wait)
            else:
                r = cfg.status(args.name)
        # A release summary; uninstall answers with a message instead.
        info = r.get("info") if isinstance(r, dict) else None
        info = info if isinstance(info, dict) else {}
        print(json.dumps({"name": args.name, "namespace": args.namespace, "verb": args.verb,
                          "version": r.get("version") if isinstance(r, dict) else None,
                          "status": info.get("status")}))
        notes = info.get("notes")
        if notes and args.verb in ("install", "upgrade"):
            print(notes, file=sys.stderr)
        return 0
    except helm.HelmError as e:
        print(f"Error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

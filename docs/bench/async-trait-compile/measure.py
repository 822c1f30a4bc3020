#!/usr/bin/env python3
"""Compile-time cost of `#[async_trait]` against native `async fn` in traits.

Generates two throwaway crates with postbox's trait shape (TRAITS traits of METHODS async
methods each, IMPLS implementations, and one generic caller per method that awaits it from a
spawned task, as the runtime does) -- one with `#[async_trait]`, one with native
`fn m(&self, ..) -> impl Future<Output = ..> + Send` -- builds each REPS times from a warm
dependency cache (only the crate itself recompiles) and prints the medians as JSON.

    python3 docs/bench/async-trait-compile/measure.py [--reps 5] [--dir /tmp/async-trait-compile]
"""
import argparse, json, os, shutil, statistics, subprocess, time

TRAITS, METHODS, IMPLS = 9, 8, 3  # postbox: 9 backend traits, ~70 async methods, 3 impls


def crate(native: bool) -> str:
    out = ["#![allow(dead_code)]", "pub struct Row(pub i64, pub String);"] + (["use std::future::Future;"] if native else [])
    for t in range(TRAITS):
        if not native:
            out.append("#[async_trait::async_trait]")
        out.append(f"pub trait T{t}: Send + Sync + 'static {{")
        for m in range(METHODS):
            sig = f"(&self, a: &str, b: &[i64]) -> Result<Vec<Row>, String>"
            if native:
                out.append(f"    fn m{m}(&self, a: &str, b: &[i64]) -> impl Future<Output = Result<Vec<Row>, String>> + Send;")
            else:
                out.append(f"    async fn m{m}{sig};")
        out.append("}")
        for i in range(IMPLS):
            out.append(f"pub struct S{t}_{i}(pub std::sync::Arc<std::sync::Mutex<Vec<i64>>>);")
            if not native:
                out.append("#[async_trait::async_trait]")
            out.append(f"impl T{t} for S{t}_{i} {{")
            for m in range(METHODS):
                body = (f"let n = self.0.lock().map_err(|e| e.to_string())?.len() as i64 + b.len() as i64 + {m};"
                        f" tokio::task::yield_now().await; Ok(vec![Row(n, a.to_owned())])")
                if native:
                    out.append(f"    fn m{m}(&self, a: &str, b: &[i64]) -> impl Future<Output = Result<Vec<Row>, String>> + Send {{ async move {{ {body} }} }}")
                else:
                    out.append(f"    async fn m{m}(&self, a: &str, b: &[i64]) -> Result<Vec<Row>, String> {{ {body} }}")
            out.append("}")
        for m in range(METHODS):
            out.append(f"pub async fn call{t}_{m}<B: T{t}>(b: std::sync::Arc<B>) -> usize {{"
                       f" tokio::spawn(async move {{ b.m{m}(\"q\", &[1, 2]).await.map(|v| v.len()).unwrap_or(0) }}).await.unwrap_or(0) }}")
        for i in range(IMPLS):
            out.append(f"pub async fn use{t}_{i}() -> usize {{ let b = std::sync::Arc::new(S{t}_{i}(Default::default())); 0"
                       + "".join(f" + call{t}_{m}(b.clone()).await" for m in range(METHODS)) + " }")
    return "\n".join(out) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--dir", default="/tmp/async-trait-compile")
    args = ap.parse_args()
    shutil.rmtree(args.dir, ignore_errors=True)
    os.makedirs(args.dir)
    results = {}
    for name, native in (("async_trait", False), ("native", True)):
        d = os.path.join(args.dir, name)
        os.makedirs(os.path.join(d, "src"))
        deps = 'tokio = { version = "1", features = ["rt"] }\n' + ("" if native else 'async-trait = "0.1"\n')
        open(os.path.join(d, "Cargo.toml"), "w").write(
            f'[package]\nname = "{name}"\nversion = "0.0.0"\nedition = "2024"\n\n[dependencies]\n{deps}')
        open(os.path.join(d, "src", "lib.rs"), "w").write(crate(native))
        env = dict(os.environ, CARGO_TARGET_DIR=os.path.join(args.dir, "target"))
        subprocess.run(["cargo", "build", "-q"], cwd=d, env=env, check=True)  # dependencies
        times = []
        for _ in range(args.reps):
            os.utime(os.path.join(d, "src", "lib.rs"))
            t = time.perf_counter()
            subprocess.run(["cargo", "build", "-q"], cwd=d, env=env, check=True)
            times.append(time.perf_counter() - t)
        results[name] = {"median_s": round(statistics.median(times), 3), "runs_s": [round(x, 3) for x in times]}
    results["shape"] = {"traits": TRAITS, "methods_per_trait": METHODS, "impls_per_trait": IMPLS}
    results["ratio_async_trait_over_native"] = round(results["async_trait"]["median_s"] / results["native"]["median_s"], 3)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()

//! Rust-only alloc+release throughput of `SegmentAllocator`, for
//! `benchmarks/bench_allocator.py`.
//!
//! Usage: `alloc_throughput THREADS BATCH ITERATIONS [PAGES_PER_SEGMENT] [SEGMENTS]`
//!
//! Each thread repeats `alloc_into(BATCH)` + `release(ids)` ITERATIONS times on
//! one allocator shared through an `Arc`; buffers are allocated once, outside
//! the timed loop. One "op" is one alloc call plus one release call. Prints one
//! JSON object on stdout. The pool holds 4 × THREADS × BATCH pages (at least
//! one segment) unless SEGMENTS is given.
//!
//! Build: `cargo build --release -p radixseg-core --example alloc_throughput`.

use radixseg_core::SegmentAllocator;
use std::error::Error;
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

const USAGE: &str =
    "usage: alloc_throughput THREADS BATCH ITERATIONS [PAGES_PER_SEGMENT] [SEGMENTS]";

/// Positional argument `i` as an integer, or `default` when absent.
fn arg(args: &[String], i: usize, name: &str, default: Option<u64>) -> Result<u64, String> {
    match args.get(i) {
        Some(s) => s
            .parse::<u64>()
            .map_err(|e| format!("{name} must be a non-negative integer, got {s:?}: {e}")),
        None => default.ok_or_else(|| format!("{USAGE}; missing {name}")),
    }
}

/// One thread's timed loop; returns its elapsed time.
fn worker(
    alloc: &SegmentAllocator,
    batch: usize,
    iterations: u64,
    start: &Barrier,
) -> Result<Duration, Box<dyn Error + Send + Sync>> {
    let mut buf: Vec<u32> = Vec::with_capacity(batch);
    let mut ids: Vec<i64> = Vec::with_capacity(batch);
    // Warm-up: touch the pages and the buffers once before timing.
    alloc.alloc_into(batch, &mut buf)?;
    ids.extend(buf.iter().map(|&p| i64::from(p)));
    alloc.release(&ids)?;
    start.wait();
    let t0 = Instant::now();
    for _ in 0..iterations {
        buf.clear();
        alloc.alloc_into(batch, &mut buf)?;
        ids.clear();
        ids.extend(buf.iter().map(|&p| i64::from(p)));
        alloc.release(&ids)?;
    }
    Ok(t0.elapsed())
}

fn main() -> Result<(), Box<dyn Error>> {
    let args: Vec<String> = std::env::args().collect();
    let threads = arg(&args, 1, "THREADS", None)?.max(1) as usize;
    let batch = arg(&args, 2, "BATCH", None)?.max(1) as usize;
    let iterations = arg(&args, 3, "ITERATIONS", None)?;
    let pps = arg(&args, 4, "PAGES_PER_SEGMENT", Some(1024))? as u32;
    let want_pages = 4 * (threads * batch) as u64;
    let segments = arg(
        &args,
        5,
        "SEGMENTS",
        Some(want_pages.div_ceil(u64::from(pps)).max(1)),
    )?;

    let alloc = Arc::new(SegmentAllocator::new(16, pps)?);
    for _ in 0..segments {
        alloc.add_segment()?;
    }
    let total_pages = alloc.total_pages();
    let start = Arc::new(Barrier::new(threads));

    let handles: Vec<_> = (0..threads)
        .map(|_| {
            let alloc = Arc::clone(&alloc);
            let start = Arc::clone(&start);
            std::thread::spawn(move || worker(&alloc, batch, iterations, &start))
        })
        .collect();
    let mut slowest = Duration::ZERO;
    for h in handles {
        let elapsed = h
            .join()
            .map_err(|_| "a benchmark thread panicked")?
            .map_err(|e| e.to_string())?;
        slowest = slowest.max(elapsed);
    }
    alloc.check_invariants()?;
    if alloc.free_pages() != total_pages {
        return Err(format!(
            "{} of {total_pages} pages free at the end",
            alloc.free_pages()
        )
        .into());
    }

    let secs = slowest.as_secs_f64();
    let ops = iterations as f64 * threads as f64;
    println!(
        "{{\"threads\": {threads}, \"batch\": {batch}, \"iterations\": {iterations}, \
         \"pages_per_segment\": {pps}, \"segments\": {segments}, \"seconds\": {secs:.6}, \
         \"ops_per_s\": {:.1}, \"pages_per_s\": {:.1}, \"ns_per_op\": {:.2}}}",
        ops / secs,
        ops * batch as f64 / secs,
        secs * 1e9 / iterations as f64,
    );
    Ok(())
}

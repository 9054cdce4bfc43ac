//! Replays the committed seeds (`fuzz/seeds/TARGET/`) and a batch of
//! pseudo-random inputs through both harnesses, without libFuzzer or any
//! instrumentation: a plain `cargo test --manifest-path fuzz/Cargo.toml`
//! on stable. A file named on the command line of `scripts/fuzz.sh
//! --replay` goes through the same `run` functions.

use std::path::Path;

fn replay_dir(target: &str, run: fn(&[u8])) -> usize {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("seeds")
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return 0;
    };
    let mut n = 0;
    for e in entries {
        let path = e.unwrap().path();
        if path.is_file() {
            let data = std::fs::read(&path).unwrap();
            eprintln!("replaying {}", path.display());
            run(&data);
            n += 1;
        }
    }
    n
}

/// xorshift64*: deterministic bytes, no dependency.
fn random_inputs(seed: u64, count: usize, run: fn(&[u8])) {
    let mut s = seed;
    let mut next = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        s.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    for _ in 0..count {
        let len = (next() % 2048) as usize;
        let data: Vec<u8> = (0..len).map(|_| next() as u8).collect();
        run(&data);
    }
}

#[test]
fn allocator_seeds() {
    replay_dir("allocator", radixseg_fuzz::allocator::run);
}

#[test]
fn tree_seeds() {
    replay_dir("tree", radixseg_fuzz::tree::run);
}

#[test]
fn allocator_random() {
    random_inputs(0x5eed_a110, 300, radixseg_fuzz::allocator::run);
}

#[test]
fn tree_random() {
    random_inputs(0x5eed_7eed, 300, radixseg_fuzz::tree::run);
}

/// `RADIXSEG_FUZZ_REPLAY=TARGET:FILE cargo test --release --manifest-path
/// fuzz/Cargo.toml --test replay replay_file -- --nocapture` prints the
/// decoded actions of FILE (a crash artifact, say) and runs it.
#[test]
fn replay_file() {
    let Ok(spec) = std::env::var("RADIXSEG_FUZZ_REPLAY") else {
        return;
    };
    let (target, file) = spec.split_once(':').expect("TARGET:FILE");
    let data = std::fs::read(file).unwrap();
    type Describe = fn(&[u8]) -> String;
    let (describe, run): (Describe, fn(&[u8])) = match target {
        "allocator" => (
            radixseg_fuzz::allocator::describe,
            radixseg_fuzz::allocator::run,
        ),
        "tree" => (radixseg_fuzz::tree::describe, radixseg_fuzz::tree::run),
        other => panic!("unknown target {other}"),
    };
    eprintln!("{}", describe(&data));
    run(&data);
}

//! The stable smoke of the fuzz targets, run by `make test`: each target's seeds, its
//! regression inputs (`fuzz/regressions/<target>/`, inputs that once failed) and a fixed
//! set of mutations of them, the same on every run. `make fuzz` explores far more.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::path::{Path, PathBuf};

use super::{Rng, TARGETS, Target};

/// Mutated inputs per target: a few seconds for all targets in a debug build.
const MUTATIONS: usize = 1000;

/// Pieces of the targets' grammars (JSON, SSE, NDJSON, headers, YAML) that random byte
/// changes rarely produce.
const DICTIONARY: &[&[u8]] = &[
    b"\"",
    b"{",
    b"}",
    b"[",
    b"]",
    b",",
    b":",
    b"null",
    b"true",
    b"-1",
    b"1e999",
    b"-0",
    b"4294967296",
    b"18446744073709551616",
    b"99999999999999999999",
    b"\n",
    b"\r",
    b"\r\n",
    b"\n\n",
    b"data: ",
    b"event: ",
    b"\xEF\xBB\xBF",
    b"\"type\"",
    b"\"text\"",
    b"\"index\"",
    b"\"content\"",
    b"\"tool_calls\"",
    b"\\u0000",
    b"\\ud800",
    b"\xC3\xA9",
    b"+99999999999:00",
    b"---\n",
    b"&a ",
    b"*a",
    b"\r\n--",
    b"Content-Disposition: form-data; name=\"file\"",
    b"\"custom_id\"",
    b"\"notify\"",
    b"http://[::ffff:127.0.0.1]/",
];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default()
}

/// The files under `dir` (links followed, as libFuzzer does), in path order; none when it
/// does not exist.
fn files_in(dir: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut paths = Vec::new();
    collect(dir, &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let bytes = std::fs::read(&p).unwrap();
            (p, bytes)
        })
        .collect()
}

fn collect(dir: &Path, paths: &mut Vec<PathBuf>) {
    for path in std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path())
    {
        if path.is_dir() {
            collect(&path, paths);
        } else if path.is_file() {
            paths.push(path);
        }
    }
}

/// One to four random edits of `input`: flip, insert or delete bytes, repeat a range,
/// insert a dictionary word, or splice in the tail of another input.
fn mutate(input: &[u8], others: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let at = rng.below(out.len() + 1);
        match rng.below(7) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 => out.insert(at, rng.next_u64() as u8),
            2 => {
                let end = (at + 1 + rng.below(16)).min(out.len());
                out.drain(at..end);
            }
            3 => {
                let end = (at + 1 + rng.below(64)).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
            4 | 5 => {
                let word = DICTIONARY[rng.below(DICTIONARY.len())];
                out.splice(at..at, word.iter().copied());
            }
            _ => {
                let other = &others[rng.below(others.len())];
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
        }
    }
    out
}

/// Runs `target` on `input`; on a failure, shows the input (to keep as a regression) and
/// fails with the target's message.
fn check(target: &Target, what: &str, input: &[u8]) {
    if let Err(panic) = catch_unwind(AssertUnwindSafe(|| (target.run)(input))) {
        eprintln!(
            "fuzz target `{}` failed on {what}: {:?}",
            target.name,
            String::from_utf8_lossy(input)
        );
        resume_unwind(panic);
    }
}

fn smoke(name: &str) {
    let target = TARGETS.iter().find(|t| t.name == name).unwrap();
    let root = repo_root();
    let mut inputs: Vec<Vec<u8>> = Vec::new();
    let seeds = files_in(&root.join("fuzz/seeds").join(name));
    assert!(!seeds.is_empty(), "no seeds for {name}");
    for (path, bytes) in seeds {
        check(target, &path.display().to_string(), &bytes);
        inputs.push(bytes);
    }
    for (path, bytes) in files_in(&root.join("fuzz/regressions").join(name)) {
        check(target, &path.display().to_string(), &bytes);
        inputs.push(bytes);
    }
    let mut rng = Rng::from_data(name.as_bytes());
    for i in 0..MUTATIONS {
        let input = mutate(&inputs[rng.below(inputs.len())], &inputs, &mut rng);
        check(target, &format!("mutation {i}"), &input);
    }
}

macro_rules! smoke_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                smoke(stringify!($name));
            }
        )*

        #[test]
        fn every_target_has_a_smoke_test() {
            let tested = [$(stringify!($name)),*];
            for target in TARGETS {
                assert!(tested.contains(&target.name), "{} has no smoke test", target.name);
            }
        }
    };
}

smoke_tests!(
    chat_request,
    messages_request,
    embeddings_request,
    provider_response,
    provider_stream,
    stream_framing,
    ratelimit_headers,
    config_load,
    batch_upload,
    job_request,
);

/// Every target is a cargo-fuzz target of `fuzz/` (so `make fuzz` runs it), and `fuzz/`
/// has no other.
#[test]
fn every_target_is_a_cargo_fuzz_target() {
    let manifest = std::fs::read_to_string(repo_root().join("fuzz/Cargo.toml")).unwrap();
    let bins = manifest.matches("[[bin]]").count();
    assert_eq!(bins, TARGETS.len(), "fuzz/Cargo.toml has {bins} targets");
    for target in TARGETS {
        assert!(
            manifest.contains(&format!("name = \"{}\"", target.name)),
            "{} is not in fuzz/Cargo.toml",
            target.name
        );
        let source = repo_root().join(format!("fuzz/fuzz_targets/{}.rs", target.name));
        let text = std::fs::read_to_string(&source).unwrap();
        assert!(
            text.contains(&format!("fuzzing::{}(", target.name)),
            "{} does not call its body",
            source.display()
        );
    }
}

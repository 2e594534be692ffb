//! Writes the CustomResourceDefinitions generated from the floodgate-crds types.
//!
//! `crdgen DIR...` writes one `<plural>.<group>.yaml` per kind into each DIR (by default
//! `crds/manifests` and `charts/floodgate/crds`). `crdgen --stdout` prints them as one stream.

use floodgate_crds::{Kind, crd_yaml};
use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("crdgen: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: &[String]) -> Result<(), Box<dyn std::error::Error>> {
    if args.iter().any(|a| a == "--stdout") {
        let mut out = std::io::stdout().lock();
        for kind in Kind::ALL {
            writeln!(out, "---")?;
            out.write_all(crd_yaml(kind)?.as_bytes())?;
        }
        return Ok(());
    }
    let dirs: Vec<PathBuf> = if args.is_empty() {
        vec!["crds/manifests".into(), "charts/floodgate/crds".into()]
    } else {
        args.iter().map(PathBuf::from).collect()
    };
    for dir in dirs {
        std::fs::create_dir_all(&dir)?;
        for kind in Kind::ALL {
            let path = dir.join(kind.manifest_file_name());
            std::fs::write(&path, crd_yaml(kind)?)?;
            eprintln!("wrote {}", path.display());
        }
    }
    Ok(())
}

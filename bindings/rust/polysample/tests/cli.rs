//! The crate and the C command-line tool (`polysample sample`, named by
//! POLYSAMPLE_CLI; run-tests.sh sets it from the build directory) draw the
//! same tokens and logprobs from the same .npy file.

mod common;

use common::*;
use polysample::{Logits, Params};
use std::path::{Path, PathBuf};
use std::process::Command;

#[test]
fn tokens_and_logprobs_equal_the_command_line_tools() {
    let Some(cli) = std::env::var_os("POLYSAMPLE_CLI").map(PathBuf::from) else {
        report_skip("comparison with the C command-line tool", "POLYSAMPLE_CLI is not set");
        return;
    };
    const ROWS: usize = 6;
    const VOCAB: usize = 3000;
    const SAMPLES: usize = 4;
    let logits = Generator::new(30).normal_logits(ROWS * VOCAB, 2.0);
    let path = Path::new(env!("CARGO_TARGET_TMPDIR")).join("polysample-cli-logits.npy");
    write_npy_f32(&path, &logits, ROWS, VOCAB);

    let output = Command::new(&cli)
        .args(["sample", "--backend", "cpu", "--temperature", "0.8", "--top-k", "50", "--top-p", "0.9"])
        .args(["--min-p", "0.01", "--seed", "1234", "--offset", "2", "--num-samples", &SAMPLES.to_string()])
        .arg("--logprobs")
        .arg(&path)
        .output()
        .unwrap_or_else(|error| panic!("could not run {}: {error}", cli.display()));
    assert!(output.status.success(), "{}: {}", cli.display(), String::from_utf8_lossy(&output.stderr));
    let mut cli_tokens = Vec::new();
    let mut cli_logprobs = Vec::new();
    for line in String::from_utf8(output.stdout).unwrap().lines() {
        let (tokens, logprobs) = line.split_once('\t').expect("tokens<TAB>logprobs");
        cli_tokens.extend(tokens.split(' ').map(|token| token.parse::<i32>().unwrap()));
        // Printed with 9 significant digits: a float reads back exactly.
        cli_logprobs.extend(logprobs.split(' ').map(|logprob| logprob.parse::<f32>().unwrap()));
    }

    let params = Params::new()
        .temperature(0.8)
        .top_k(50)
        .top_p(0.9)
        .min_p(0.01)
        .seed(1234)
        .offset(2)
        .num_samples(SAMPLES as u32);
    let (tokens, logprobs) = cpu_context().sample_with_logprobs(&Logits::f32(&logits, ROWS, VOCAB), &params).unwrap();
    assert_eq!(tokens.len(), ROWS * SAMPLES);
    assert_eq!(tokens, cli_tokens);
    assert_eq!(logprobs, cli_logprobs);
}

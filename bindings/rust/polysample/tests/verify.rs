//! Speculative decoding verification through the safe API
//! (`Context::verify`, docs/SAMPLING.md section 7): cases whose answer is
//! known without the library (a draft equal to the target is always
//! accepted; a token the target filters out is always rejected; greedy
//! targets, a chain and a tree, checked by hand), a tree drawn from draft
//! logits against the C command-line tool, and bad input refused with the
//! library's message.

mod common;

use common::*;
use polysample::{Backend, ContextOptions, Drafts, Logits, Params, Status, Verification};
use std::path::{Path, PathBuf};
use std::process::Command;

const VOCAB: usize = 300;
const K: usize = 4;
const REQUESTS: usize = 8;

/// Row `row` of a row-major matrix of `VOCAB` columns.
fn row_of(values: &[f32], row: usize) -> &[f32] {
    &values[row * VOCAB..(row + 1) * VOCAB]
}

/// The emitted entries of every request are followed by -1 (tokens, nodes)
/// and NaN (logprobs) up to k + 1.
fn assert_padded(result: &Verification, positions: usize) {
    for r in 0..result.requests() {
        let emitted = result.emitted(r).len();
        for e in emitted..positions {
            let at = r * positions + e;
            assert_eq!((result.tokens[at], result.path_nodes[at]), (-1, -1), "request {r} entry {e}");
            assert!(result.logprobs[at].is_nan(), "request {r} entry {e}: {}", result.logprobs[at]);
        }
    }
}

#[test]
fn a_draft_equal_to_the_target_is_always_accepted() {
    let target = Generator::new(71).normal_logits(REQUESTS * (K + 1) * VOCAB, 2.0);
    // Node i's draft row is the target's row after node i - 1, its parent.
    let draft: Vec<f32> = (0..REQUESTS)
        .flat_map(|r| (0..K).flat_map(move |i| (r * (K + 1) + i) * VOCAB..(r * (K + 1) + i + 1) * VOCAB))
        .map(|index| target[index])
        .collect();
    let params = Params::new().temperature(0.8).top_k(50).top_p(0.9);
    let target_logits = Logits::f32(&target, REQUESTS * (K + 1), VOCAB);
    let draft_logits = Logits::f32(&draft, REQUESTS * K, VOCAB);
    for (backend, mut context) in contexts("verify") {
        let probs = context.probs(&target_logits, &params).unwrap();
        for seed in 0..6u64 {
            // The drafted tokens, drawn from the draft's own distribution.
            let tokens = context.sample(&draft_logits, &params.seed(1000 + seed)).unwrap();
            let drafts = Drafts::chain(K, &tokens).logits(draft_logits, &params);
            let result = context
                .verify(&target_logits, &params.seed(seed), &drafts)
                .unwrap_or_else(|error| panic!("{backend}: {error}"));
            assert_padded(&result, K + 1);
            for r in 0..REQUESTS {
                assert_eq!(result.accepted[r], K as i32, "seed {seed} request {r}");
                let emitted = result.emitted(r);
                assert_eq!(emitted[..K], tokens[r * K..(r + 1) * K], "seed {seed} request {r}");
                assert_eq!(result.path(r), [0, 1, 2, 3, 4]);
                for (e, &token) in emitted.iter().enumerate() {
                    let p = probs[(r * (K + 1) + e) * VOCAB + token as usize] as f64;
                    assert!(p > 0.0, "seed {seed} request {r}: token {token} at node {e} is filtered out");
                    let logprob = result.logprobs[r * (K + 1) + e] as f64;
                    assert!((logprob - p.ln()).abs() <= 1e-5, "seed {seed} request {r} node {e}: {logprob} vs ln {p}");
                }
            }
        }
    }
}

#[test]
fn a_greedy_target_accepts_its_argmax_drafts() {
    let target = Generator::new(72).normal_logits(REQUESTS * (K + 1) * VOCAB, 2.0);
    let argmax: Vec<i32> = (0..REQUESTS * (K + 1)).map(|row| argmax(row_of(&target, row))).collect();
    // One-hot drafts of the argmax after each node's parent: the whole path
    // is accepted and the bonus is the argmax after node k, each with
    // probability 1.
    let tokens: Vec<i32> =
        (0..REQUESTS).flat_map(|r| (0..K).map(move |i| r * (K + 1) + i)).map(|row| argmax[row]).collect();
    let mut context = cpu_context();
    let result = context
        .verify(
            &Logits::f32(&target, REQUESTS * (K + 1), VOCAB),
            &Params::new().greedy().seed(5),
            &Drafts::chain(K, &tokens),
        )
        .unwrap();
    assert_eq!(result.accepted, vec![K as i32; REQUESTS]);
    assert_eq!(result.tokens, argmax);
    assert!(result.logprobs.iter().all(|&logprob| logprob == 0.0), "{:?}", result.logprobs);
}

#[test]
fn a_token_the_target_filters_out_is_always_rejected() {
    let target = Generator::new(73).normal_logits(REQUESTS * (K + 1) * VOCAB, 2.0);
    let params = Params::new().top_k(3);
    let top3 = |row: usize| rank_order(row_of(&target, row))[..3].to_vec();
    // Node 1 of each request drafts its root row's 11th most probable token,
    // which top-k 3 leaves out; later nodes draft the top token.
    let mut tokens = Vec::new();
    for r in 0..REQUESTS {
        let root = r * (K + 1);
        tokens.push(rank_order(row_of(&target, root))[10] as i32);
        tokens.extend((1..K).map(|i| argmax(row_of(&target, root + i))));
    }
    // The draft's probabilities: 0.9 on the drafted token, the rest spread evenly.
    let probs: Vec<f32> = tokens
        .iter()
        .flat_map(|&token| (0..VOCAB).map(move |i| if i == token as usize { 0.9 } else { 0.1 / (VOCAB - 1) as f32 }))
        .collect();
    let mut context = cpu_context();
    let target_logits = Logits::f32(&target, REQUESTS * (K + 1), VOCAB);
    let one_hot = Drafts::chain(K, &tokens);
    for drafts in [one_hot, one_hot.probs(&probs)] {
        for seed in 0..50u64 {
            let result = context.verify(&target_logits, &params.seed(seed), &drafts).unwrap();
            assert_padded(&result, K + 1);
            for r in 0..REQUESTS {
                assert_eq!(result.accepted[r], 0, "seed {seed} request {r}");
                let correction = result.emitted(r)[0] as usize;
                assert!(top3(r * (K + 1)).contains(&correction), "seed {seed} request {r}: token {correction}");
                assert_eq!(result.path(r), [0]);
            }
        }
    }
}

#[test]
fn a_greedy_tree_takes_the_accepted_sibling() {
    // Nodes 1 and 2 are the root's children, node 3 is node 1's. Node 1's
    // token is not the argmax after the root, node 2's is: node 1 is
    // rejected (its child with it), node 2 accepted, and node 2 is a leaf,
    // so the bonus is the argmax after node 2.
    const TREE_K: usize = 3;
    let target = Generator::new(74).normal_logits(2 * (TREE_K + 1) * VOCAB, 2.0);
    let argmax_at = |request: usize, node: usize| argmax(row_of(&target, request * (TREE_K + 1) + node));
    let mut tokens = Vec::new();
    for r in 0..2 {
        let best = argmax_at(r, 0);
        tokens.extend([(best + 1) % VOCAB as i32, best, argmax_at(r, 1)]);
    }
    let parents = [0, 0, 1, 0, 0, 1];
    let mut context = cpu_context();
    let result = context
        .verify(
            &Logits::f32(&target, 2 * (TREE_K + 1), VOCAB),
            &Params::new().greedy(),
            &Drafts::tree(TREE_K, &tokens, &parents),
        )
        .unwrap();
    assert_padded(&result, TREE_K + 1);
    for r in 0..2 {
        assert_eq!(result.accepted[r], 1, "request {r}");
        assert_eq!(result.emitted(r), [argmax_at(r, 0), argmax_at(r, 2)], "request {r}");
        assert_eq!(result.path(r), [0, 2], "request {r}");
    }
}

#[test]
fn a_tree_from_draft_logits_equals_the_command_line_tools() {
    let Some(cli) = std::env::var_os("POLYSAMPLE_CLI").map(PathBuf::from) else {
        report_skip("verify against the C command-line tool", "POLYSAMPLE_CLI is not set");
        return;
    };
    const TREE_PARENTS: [i32; K] = [0, 0, 1, 2];
    let target = Generator::new(75).normal_logits(REQUESTS * (K + 1) * VOCAB, 2.0);
    // Node i's draft logits: the target's after its parent, with noise.
    let noise = Generator::new(76).normal_logits(REQUESTS * K * VOCAB, 0.7);
    let draft: Vec<f32> = (0..REQUESTS * K * VOCAB)
        .map(|index| {
            let (row, column) = (index / VOCAB, index % VOCAB);
            let parent = TREE_PARENTS[row % K] as usize;
            target[(row / K * (K + 1) + parent) * VOCAB + column] + noise[index]
        })
        .collect();
    let parents: Vec<i32> = (0..REQUESTS).flat_map(|_| TREE_PARENTS).collect();
    let draft_params = Params::new().temperature(0.9).top_k(40);
    let draft_logits = Logits::f32(&draft, REQUESTS * K, VOCAB);
    let mut context = cpu_context();
    let tokens = context.sample(&draft_logits, &draft_params.seed(9)).unwrap();
    let params = Params::new().temperature(0.9).top_p(0.95).seed(77);
    let result = context
        .verify(
            &Logits::f32(&target, REQUESTS * (K + 1), VOCAB),
            &params,
            &Drafts::tree(K, &tokens, &parents).logits(draft_logits, &draft_params),
        )
        .unwrap();

    let directory = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let file = |name: &str| directory.join(format!("polysample-verify-{name}.npy"));
    write_npy_f32(&file("target"), &target, REQUESTS * (K + 1), VOCAB);
    write_npy_f32(&file("draft"), &draft, REQUESTS * K, VOCAB);
    write_npy_i32(&file("tokens"), &tokens, REQUESTS, K);
    write_npy_i32(&file("parents"), &parents, REQUESTS, K);
    let output = Command::new(&cli)
        .args(["sample", "--backend", "cpu", "--verify", "--logprobs", "--temperature", "0.9", "--top-p", "0.95"])
        .args(["--seed", "77", "--draft-temperature", "0.9", "--draft-top-k", "40", "--draft-tokens"])
        .arg(file("tokens"))
        .arg("--draft-parents")
        .arg(file("parents"))
        .arg("--draft-logits")
        .arg(file("draft"))
        .arg(file("target"))
        .output()
        .unwrap_or_else(|error| panic!("could not run {}: {error}", cli.display()));
    assert!(output.status.success(), "{}: {}", cli.display(), String::from_utf8_lossy(&output.stderr));
    let text = String::from_utf8(output.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), REQUESTS, "{text}");
    let mut depths = Vec::new();
    for (r, line) in lines.iter().enumerate() {
        let fields: Vec<&str> = line.split('\t').collect();
        assert_eq!(fields.len(), 4, "{line}");
        let ints = |field: &str| field.split(' ').map(|value| value.parse::<i32>().unwrap()).collect::<Vec<_>>();
        assert_eq!(fields[0].parse::<i32>().unwrap(), result.accepted[r], "request {r}");
        assert_eq!(ints(fields[1]), result.emitted(r), "request {r}");
        assert_eq!(ints(fields[2]), result.path(r), "request {r}");
        // Printed with 9 significant digits: a float reads back exactly.
        let logprobs: Vec<f32> = fields[3].split(' ').map(|value| value.parse().unwrap()).collect();
        assert_eq!(logprobs, result.logprobs[r * (K + 1)..r * (K + 1) + logprobs.len()], "request {r}");
        depths.push(result.accepted[r]);
    }
    // The tree's depth is 3 (nodes 1, 3, 4 or node 2); the comparison
    // covers both a rejection and an acceptance.
    assert!(depths.iter().any(|&depth| depth > 0) && depths.iter().any(|&depth| depth < 3), "{depths:?}");
}

#[test]
fn bad_input_is_refused_with_the_librarys_message() {
    const SMALL_VOCAB: usize = 12;
    let target: Vec<f32> = (0..3 * SMALL_VOCAB).map(|i| (i % 7) as f32 * 0.5).collect();
    let target_logits = Logits::f32(&target, 3, SMALL_VOCAB);
    let mut context = cpu_context();
    let mut refused = |params: &Params<'_>, drafts: &Drafts<'_>, status: Status, message: &str| {
        let error = context.verify(&target_logits, params, drafts).unwrap_err();
        assert_eq!(error.status, status, "{error}");
        assert!(error.message.contains(message), "'{}' lacks '{message}'", error.message);
    };
    let plain = Params::new();
    let tokens = [4, 5];
    let chain = Drafts::chain(2, &tokens);

    // The library's checks and messages.
    refused(
        &plain,
        &Drafts::chain(2, &[4, 12]),
        Status::InvalidParameter,
        "request 0, draft node 2: token 12 is outside the vocab of 12",
    );
    refused(
        &plain,
        &Drafts::tree(2, &tokens, &[0, 2]),
        Status::InvalidParameter,
        "request 0, draft node 2: parent 2; a node's parent is an earlier node, 0 (the root) .. 1",
    );
    let mut probs = vec![0.05f32; 2 * SMALL_VOCAB];
    probs[3] = 1.5;
    refused(
        &plain,
        &chain.probs(&probs),
        Status::InvalidParameter,
        "request 0, draft node 1: draft_probs[3] is 1.5; expected a probability in [0, 1]",
    );
    probs[3] = 0.05;
    probs[4] = 0.0;
    refused(
        &plain,
        &chain.probs(&probs),
        Status::InvalidParameter,
        "request 0, draft node 1: token 4 has draft probability 0",
    );
    let three_rows = Logits::f32(&target, 3, SMALL_VOCAB);
    refused(
        &plain,
        &chain.logits(three_rows, &plain),
        Status::InvalidArgument,
        "drafts->draft_logits is 3 x 12; the call needs requests x k = 2 rows of the target's vocab 12",
    );
    refused(&plain.top_p(0.0), &chain, Status::InvalidParameter, "target_params.top_p is 0; expected in (0, 1]");
    let two_rows = Logits::f32(&target[..2 * SMALL_VOCAB], 2, SMALL_VOCAB);
    refused(
        &plain,
        &chain.logits(two_rows, &plain.min_p(2.0)),
        Status::InvalidParameter,
        "drafts->draft_params.min_p is 2",
    );
    refused(&plain.num_samples(2), &chain, Status::Unsupported, "target_params.num_samples is 2");

    // Lengths, checked here so that the library never reads past a slice.
    refused(&plain, &Drafts::chain(0, &[]), Status::InvalidParameter, "drafts nodes is 0; expected 1 .. 64");
    refused(&plain, &Drafts::chain(65, &tokens), Status::InvalidParameter, "drafts nodes is 65");
    refused(
        &plain,
        &Drafts::chain(1, &tokens),
        Status::InvalidArgument,
        "target logits have 3 rows, not a multiple of k + 1 = 2",
    );
    refused(
        &plain,
        &Drafts::chain(2, &[4]),
        Status::InvalidArgument,
        "draft tokens has 1 values; expected requests x k = 1 x 2 = 2",
    );
    refused(
        &plain,
        &Drafts::tree(2, &tokens, &[0]),
        Status::InvalidArgument,
        "draft parents has 1 values; expected requests x k = 1 x 2 = 2",
    );
    refused(
        &plain,
        &chain.probs(&probs[..SMALL_VOCAB]),
        Status::InvalidArgument,
        "draft probs has 12 values; expected requests x k x vocab 12 = 1 x 2 x 12 = 24",
    );
    refused(
        &plain.temperature_per_row(&[1.0, 1.0]),
        &chain,
        Status::InvalidArgument,
        "target params: temperature_per_row has 2 values for 1 rows; expected one per row (in a verification, a \
         row is a request)",
    );
}

#[test]
fn a_bad_target_row_makes_its_request_bad() {
    let mut target = Generator::new(78).normal_logits(2 * 3 * VOCAB, 2.0);
    target[(3 + 2) * VOCAB + 9] = f32::NAN; // request 1, the row after node 2
    let tokens = [1, 2, 3, 4];
    let logits = Logits::f32(&target, 6, VOCAB);
    let result = cpu_context().verify(&logits, &Params::new(), &Drafts::chain(2, &tokens)).unwrap();
    assert_eq!(result.accepted[1], -1);
    assert!(result.emitted(1).is_empty() && result.path(1).is_empty());
    assert_eq!(result.tokens[3..], [-1, -1, -1]);
    assert!(result.logprobs[3..].iter().all(|logprob| logprob.is_nan()));
    assert!(result.accepted[0] >= 0, "request 0 is good: {:?}", result.accepted);

    let mut checking = ContextOptions::new().backend(Backend::Cpu).check_rows(true).create().unwrap();
    let error = checking.verify(&logits, &Params::new(), &Drafts::chain(2, &tokens)).unwrap_err();
    assert_eq!(error.status, Status::BadRow);
    assert!(error.message.contains("request 1 has a target row with a NaN"), "{}", error.message);
}

//! Filter orders (docs/SAMPLING.md, section 4, "Filter orders") through the
//! safe API: on a row where every order keeps a different set (the row of
//! tests/test_filter_orders.c), `Params::filter_order` reaches the library,
//! and every backend keeps each order's set.

mod common;

use common::*;
use polysample::{FilterOrder, Logits, Params};

const ROW: [f32; 12] = [0.5, 1.0, 0.5, 2.5, 0.0, 4.0, -1.0, 1.0, 0.0, -1.0, 0.5, 1.0];

#[test]
fn each_order_keeps_its_own_set() {
    let orders: [(FilterOrder, &[usize]); 6] = [
        (FilterOrder::Polysample, &[1, 3, 5]),
        (FilterOrder::Vllm, &[1, 3, 5, 7]),
        (FilterOrder::Sglang, &[0, 1, 3, 5, 7, 11]),
        (FilterOrder::LlamaCpp, &[5]),
        (FilterOrder::FlashInferTopKFirst, &[1, 3, 5, 7, 11]),
        (FilterOrder::FlashInferJoint, &[0, 1, 2, 3, 5, 7, 10, 11]),
    ];
    for (backend, mut context) in contexts("filter_orders") {
        for (order, kept) in orders {
            let params = Params::new().temperature(3.0).top_k(6).top_p(0.6).min_p(0.02).filter_order(order);
            let probs = context
                .probs(&Logits::f32(&ROW, 1, 12), &params)
                .unwrap_or_else(|error| panic!("{backend} {order:?}: {error}"));
            let got: Vec<usize> = (0..12).filter(|&i| probs[i] > 0.0).collect();
            assert_eq!(got, kept, "{backend} {order:?}");
        }
    }
}

#[test]
fn the_default_is_polysample_order() {
    assert_eq!(FilterOrder::default(), FilterOrder::Polysample);
    for (backend, mut context) in contexts("filter_orders") {
        let logits = Logits::f32(&ROW, 1, 12);
        let plain = Params::new().temperature(3.0).top_k(6).top_p(0.6).min_p(0.02).num_samples(64).seed(9);
        let explicit = plain.filter_order(FilterOrder::Polysample);
        assert_eq!(context.sample(&logits, &plain).unwrap(), context.sample(&logits, &explicit).unwrap(), "{backend}");
    }
}

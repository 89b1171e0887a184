//! Learning-rate factors against diffusers' `get_scheduler`.

use LrScheduleKind::{Constant, Cosine, CosineWithRestarts, Linear};
use sd_lora_train::lr::{LrSchedule, LrScheduleKind};

/// (kind, warmup, total, cycles, [(step, lr)]): the learning rate of an SGD
/// optimizer with lr 1.0 at each optimizer step, printed with diffusers 0.42.1:
/// ```python
/// from diffusers.optimization import get_scheduler
/// opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
/// s = get_scheduler(name, opt, num_warmup_steps=warm, num_training_steps=total, num_cycles=cycles)
/// for step in range(total + 2): lrs.append(opt.param_groups[0]["lr"]); opt.step(); s.step()
/// ```
/// (`Constant` with warm-up is diffusers' `constant_with_warmup`.)
#[allow(clippy::type_complexity)]
const DIFFUSERS: &[(LrScheduleKind, usize, usize, usize, &[(usize, f64)])] = &[
    (
        Constant,
        0,
        50,
        1,
        &[
            (0, 1.0),
            (1, 1.0),
            (2, 1.0),
            (3, 1.0),
            (5, 1.0),
            (9, 1.0),
            (10, 1.0),
            (11, 1.0),
            (17, 1.0),
            (25, 1.0),
            (33, 1.0),
            (49, 1.0),
            (50, 1.0),
            (51, 1.0),
        ],
    ), // constant
    (
        Constant,
        10,
        50,
        1,
        &[
            (0, 0.0),
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
            (5, 0.5),
            (9, 0.9),
            (10, 1.0),
            (11, 1.0),
            (17, 1.0),
            (25, 1.0),
            (33, 1.0),
            (49, 1.0),
            (50, 1.0),
            (51, 1.0),
        ],
    ), // constant_with_warmup
    (
        Linear,
        10,
        50,
        1,
        &[
            (0, 0.0),
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
            (5, 0.5),
            (9, 0.9),
            (10, 1.0),
            (11, 0.975),
            (17, 0.825),
            (25, 0.625),
            (33, 0.425),
            (49, 0.025),
            (50, 0.0),
            (51, 0.0),
        ],
    ), // linear
    (
        Linear,
        0,
        50,
        1,
        &[
            (0, 1.0),
            (1, 0.98),
            (2, 0.96),
            (3, 0.94),
            (5, 0.9),
            (9, 0.82),
            (10, 0.8),
            (11, 0.78),
            (17, 0.66),
            (25, 0.5),
            (33, 0.34),
            (49, 0.02),
            (50, 0.0),
            (51, 0.0),
        ],
    ), // linear
    (
        Cosine,
        10,
        50,
        1,
        &[
            (0, 0.0),
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
            (5, 0.5),
            (9, 0.9),
            (10, 1.0),
            (11, 0.998458666866564),
            (17, 0.9263200821770461),
            (25, 0.6913417161825449),
            (33, 0.38327731807204746),
            (49, 0.001541333133436018),
            (50, 0.0),
            (51, 0.0015413331334359626),
        ],
    ), // cosine
    (
        Cosine,
        0,
        50,
        1,
        &[
            (0, 1.0),
            (1, 0.9990133642141358),
            (2, 0.996057350657239),
            (3, 0.9911436253643444),
            (5, 0.9755282581475768),
            (9, 0.9221639627510075),
            (10, 0.9045084971874737),
            (11, 0.8852566213878946),
            (17, 0.7408768370508576),
            (25, 0.5),
            (33, 0.2591231629491423),
            (49, 0.0009866357858642205),
            (50, 0.0),
            (51, 0.0009866357858642205),
        ],
    ), // cosine
    (
        CosineWithRestarts,
        10,
        50,
        3,
        &[
            (0, 0.0),
            (1, 0.1),
            (2, 0.2),
            (3, 0.3),
            (5, 0.5),
            (9, 0.9),
            (10, 1.0),
            (11, 0.9861849601988383),
            (17, 0.46077045213607765),
            (25, 0.9619397662556434),
            (33, 0.1752759758349084),
            (49, 0.013815039801161777),
            (50, 0.0),
            (51, 0.0),
        ],
    ), // cosine_with_restarts
    (
        CosineWithRestarts,
        5,
        50,
        1,
        &[
            (0, 0.0),
            (1, 0.2),
            (2, 0.4),
            (3, 0.6),
            (5, 1.0),
            (9, 0.9806308479691594),
            (10, 0.9698463103929542),
            (11, 0.9567727288213004),
            (17, 0.8345653031794291),
            (25, 0.5868240888334653),
            (33, 0.31269670329204396),
            (49, 0.0012179748700879012),
            (50, 0.0),
            (51, 0.0),
        ],
    ), // cosine_with_restarts
];

#[test]
fn factors_match_diffusers_get_scheduler() {
    let mut max_err = 0f64;
    for &(kind, warmup_steps, total_steps, num_cycles, table) in DIFFUSERS {
        let s = LrSchedule {
            kind,
            warmup_steps,
            total_steps,
            num_cycles,
        };
        for &(step, want) in table {
            let got = s.factor(step);
            max_err = max_err.max((got - want).abs());
            assert!(
                (got - want).abs() < 1e-12,
                "{kind:?} warmup {warmup_steps} total {total_steps} cycles {num_cycles} step {step}: {got} vs {want}"
            );
        }
    }
    eprintln!("LR factors vs diffusers: max abs error {max_err:e}");
}

#[test]
fn kind_names_in_config_files() {
    #[derive(serde::Deserialize)]
    struct T {
        k: LrScheduleKind,
    }
    for (text, kind) in [
        ("constant", Constant),
        ("linear", Linear),
        ("cosine", Cosine),
        ("cosine_with_restarts", CosineWithRestarts),
    ] {
        let t: T = serde_json::from_str(&format!("{{\"k\": \"{text}\"}}")).unwrap();
        assert_eq!(t.k, kind);
        assert_eq!(serde_json::to_string(&kind).unwrap(), format!("\"{text}\""));
    }
    assert!(serde_json::from_str::<T>("{\"k\": \"cosine-with-restarts\"}").is_err());
}

#[test]
fn no_steps_after_warmup_does_not_divide_by_zero() {
    let s = LrSchedule {
        kind: Cosine,
        warmup_steps: 10,
        total_steps: 10,
        num_cycles: 1,
    };
    assert_eq!(s.factor(5), 0.5);
    assert!(s.factor(10).is_finite());
}

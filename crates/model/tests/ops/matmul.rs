use candle_core::{DType, Tensor};
use sd_lora_model::ops::matmul::matmul;

use crate::common::{Rng, max_abs_diff};

fn check(a: &Tensor, b: &Tensor) {
    // candle itself refuses some strided stacks; its result on copies is the reference.
    let want = a
        .contiguous()
        .unwrap()
        .matmul(&b.contiguous().unwrap())
        .unwrap();
    let got = matmul(a, b).unwrap();
    assert_eq!(got.dims(), want.dims());
    let diff = max_abs_diff(&got, &want);
    assert!(diff < 1e-5, "{:?} x {:?}: {diff}", a.dims(), b.dims());
}

/// The CPU f32 path (strided operands, batches split across threads or not,
/// vector shapes, an empty inner dimension) against candle's matmul.
#[test]
fn matmul_matches_candle() {
    let mut rng = Rng::new(96);
    let t = |rng: &mut Rng, s: &[usize]| rng.tensor(s, DType::F32);
    // Plain, vector-shaped and transposed operands.
    for (m, k, n) in [(7, 5, 3), (1, 9, 4), (6, 9, 1), (33, 17, 65)] {
        let (a, b) = (t(&mut rng, &[m, k]), t(&mut rng, &[k, n]));
        check(&a, &b);
        let (at, bt) = (t(&mut rng, &[k, m]), t(&mut rng, &[n, k]));
        check(&at.t().unwrap(), &bt.t().unwrap());
    }
    // Batches of one, two and eight (heads), with narrowed and transposed views.
    for lead in [vec![1, 1], vec![1, 2], vec![2, 4]] {
        let q = t(&mut rng, &[&lead[..], &[12, 5]].concat());
        let k = t(&mut rng, &[&lead[..], &[10, 5]].concat());
        let r = lead.len();
        check(&q, &k.t().unwrap());
        check(&q.narrow(r, 3, 6).unwrap(), &k.t().unwrap());
        let p = t(&mut rng, &[&lead[..], &[12, 10]].concat());
        check(&p.t().unwrap(), &q);
    }
    // A leading layout that does not collapse to one batch stride is copied.
    let x = t(&mut rng, &[3, 2, 4, 5]).transpose(0, 1).unwrap();
    let y = t(&mut rng, &[2, 3, 5, 6]);
    check(&x, &y);
    // k = 0 gives zeros; m = 0 an empty result.
    let z = matmul(&t(&mut rng, &[3, 0]), &t(&mut rng, &[0, 4])).unwrap();
    assert_eq!(z.sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
    assert_eq!(z.dims(), &[3, 4]);
    let e = matmul(&t(&mut rng, &[0, 3]), &t(&mut rng, &[3, 4])).unwrap();
    assert_eq!(e.dims(), &[0, 4]);
    // Mismatched inner dimensions are an error.
    assert!(matmul(&t(&mut rng, &[3, 4]), &t(&mut rng, &[5, 2])).is_err());
}

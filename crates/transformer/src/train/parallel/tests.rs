use super::*;

#[test]
fn shards_cover_the_batch_once_and_evenly() {
    for world in 1..=5 {
        for n in 0..=13 {
            let mut next = 0;
            for rank in 0..world {
                let rows = Shard { rank, world }.rows(n);
                assert_eq!(rows.start, next, "n {n}, world {world}, rank {rank}");
                assert!(rows.len() == n / world || rows.len() == n / world + 1);
                next = rows.end;
            }
            assert_eq!(next, n);
        }
    }
    assert_eq!(Shard::WHOLE.rows(7), 0..7);
}

/// Runs `f(rank, group)` on `world` threads and returns their results in rank order.
fn on_threads<T: Send>(world: usize, f: impl Fn(ThreadGroup) -> T + Sync) -> Vec<T> {
    std::thread::scope(|s| {
        let handles: Vec<_> = ThreadGroup::new(world)
            .into_iter()
            .map(|g| s.spawn(|| f(g)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

#[test]
fn a_thread_group_sums_gathers_and_refuses_mismatched_buffers() {
    let out = on_threads(3, |g| {
        let r = g.rank() as f32;
        let a = g.sum(Buffer::F32(vec![r, 10.0 * r])).unwrap();
        let b = g.sum(Buffer::F64(vec![1.0])).unwrap();
        let all = g.all_gather_u64(g.rank() as u64 * 7).unwrap();
        // One rank sends a different length: every rank gets the error.
        let bad = g.sum(Buffer::F32(vec![0.0; 1 + usize::from(g.rank() == 2)]));
        (a, b, all, bad.is_err())
    });
    for (a, b, all, bad) in out {
        assert_eq!(a, Buffer::F32(vec![3.0, 30.0]));
        assert_eq!(b, Buffer::F64(vec![3.0]));
        assert_eq!(all, vec![0, 7, 14]);
        assert!(bad);
    }
}

fn vars(shapes: &[&[usize]]) -> Vec<Var> {
    shapes
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let n: usize = s.iter().product();
            let t = Tensor::arange(0f32, n as f32, &Device::Cpu)
                .unwrap()
                .affine(1.0, i as f64)
                .unwrap()
                .reshape(*s)
                .unwrap();
            Var::from_tensor(&t).unwrap()
        })
        .collect()
}

#[test]
fn buckets_hold_the_last_parameters_first_and_split_at_the_size() {
    let big = BUCKET_BYTES / 4; // f32 elements of one bucket
    let vs = vars(&[&[3], &[big / 2], &[big / 2 + 1], &[2, 2]]);
    let r = GradReducer::new(Arc::new(Local), &vs).unwrap();
    // [3] (var 3) and var 2 fit one bucket; var 1 would overflow it; var 0 joins var 1.
    assert_eq!(r.buckets, vec![vec![3, 2], vec![1, 0]]);
    assert_eq!(r.place[2], (0, 4));
    assert_eq!(r.num_buckets(), 2);
    assert_eq!(
        r.bytes_per_step(),
        4 * (3 + big + 1 + 4) + 4 * 4 + 24,
        "gradients, one flag per parameter, three f64 scalars"
    );
}

#[test]
fn a_reduction_sums_over_ranks_and_keeps_a_gradient_no_rank_has_absent() {
    let sums = on_threads(2, |g| {
        let rank = g.rank();
        let vs = vars(&[&[2], &[3], &[1]]);
        let r = GradReducer::new(Arc::new(g), &vs).unwrap();
        let mut red = r.begin();
        // Var 0: on both ranks; var 1: only on rank 1; var 2: on none.
        red.add(
            0,
            Tensor::new(&[1f32 + rank as f32, 2.0], &Device::Cpu).unwrap(),
        )
        .unwrap();
        if rank == 1 {
            red.add(1, Tensor::new(&[5f32, 6.0, 7.0], &Device::Cpu).unwrap())
                .unwrap();
        }
        // The same gradient twice is an error.
        let err = red
            .add(0, Tensor::new(&[0f32, 0.0], &Device::Cpu).unwrap())
            .is_err();
        let store = red.finish().unwrap();
        let get = |i: usize| store.get(&vs[i]).map(|t| t.to_vec1::<f32>().unwrap());
        (get(0), get(1), get(2), err)
    });
    for (g0, g1, g2, err) in sums {
        assert_eq!(g0, Some(vec![3.0, 4.0]));
        assert_eq!(g1, Some(vec![5.0, 6.0, 7.0]));
        assert_eq!(g2, None);
        assert!(err);
    }
}

#[test]
fn the_streaming_backward_hands_over_each_gradient_once_last_layers_first() {
    let vs = vars(&[&[4, 3], &[3], &[3, 2]]);
    let x = Tensor::new(&[[0.5f32, -1.0, 2.0, 0.25]], &Device::Cpu).unwrap();
    let forward = || -> crate::Result<Tensor> {
        use crate::autograd::ops;
        let h = ops::broadcast_add(&ops::matmul(&x, vs[0].as_tensor())?, vs[1].as_tensor())?;
        let y = ops::matmul(&ops::silu(&h)?, vs[2].as_tensor())?;
        Ok(ops::sum_all(&ops::mul(&y, &y)?)?)
    };
    let (loss, tape) = crate::autograd::record(&vs, forward).unwrap();
    let plain = tape.backward(&loss).unwrap();
    let (loss, tape) = crate::autograd::record(&vs, forward).unwrap();
    let mut order = Vec::new();
    let mut got: Vec<Option<Tensor>> = vec![None; vs.len()];
    tape.backward_streaming(&loss, 0.5, |i, g| {
        order.push(i);
        assert!(got[i].replace(g).is_none(), "var {i} handed over twice");
        Ok(())
    })
    .unwrap();
    assert_eq!(order, vec![2, 1, 0]);
    for (i, v) in vs.iter().enumerate() {
        let want = (plain.get(v).unwrap() * 0.5).unwrap();
        let diff = (got[i].as_ref().unwrap() - want)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6, "var {i}: {diff}");
    }
}

#[test]
fn the_parameter_hash_sees_one_changed_bit() {
    let vs = vars(&[&[3], &[2]]);
    let h = params_hash(&vs).unwrap();
    assert_eq!(h, params_hash(&vars(&[&[3], &[2]])).unwrap());
    let t = vs[1]
        .as_tensor()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    let bumped = f32::from_bits(t[1].to_bits() ^ 1);
    vs[1]
        .set(&Tensor::new(&[t[0], bumped], &Device::Cpu).unwrap())
        .unwrap();
    assert_ne!(h, params_hash(&vs).unwrap());

    let out = on_threads(2, |g| {
        let vs = vars(&[&[3]]);
        if g.rank() == 1 {
            vs[0]
                .set(&Tensor::new(&[0f32, 1.0, 2.5], &Device::Cpu).unwrap())
                .unwrap();
        }
        check_in_sync(&g, &vs, 40).err().map(|e| e.to_string())
    });
    for e in out {
        let e = e.expect("the ranks differ");
        assert!(
            e.contains("differ at step 40") && e.contains("rank 1:"),
            "{e}"
        );
    }
}

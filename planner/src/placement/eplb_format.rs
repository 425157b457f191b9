//! Placements in the form DeepSeek's Expert Parallelism Load Balancer (EPLB, `deepseek-ai/EPLB`, `eplb.py`)
//! returns them and inference engines consume them, one row per MoE layer:
//!
//! - `phy2log[layer][slot]`: the logical expert held by physical slot `slot` (slots numbered GPU-major, as in
//!   [`Placement::slots`]: slot `gpu * slots_per_gpu + j`);
//! - `log2phy[layer][expert][rank]`: the physical slots of each logical expert, padded with `-1` to the largest
//!   replica count over all layers (EPLB pads to `logcnt.max()`);
//! - `logcnt[layer][expert]`: replicas of each logical expert.
//!
//! JSON uses exactly these three field names. EPLB's form has no token shares: a placement's
//! [`Placement::shares`] are dropped on export (tokens are split evenly over replicas, as EPLB assumes).

use serde::{Deserialize, Serialize};
use switchyard_cost::Placement;

use super::error::PlacementAlgoError;

/// EPLB's placement tensors for several MoE layers (see the module documentation).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EplbTensors {
    /// Per layer, the logical expert of each physical slot.
    pub phy2log: Vec<Vec<i64>>,
    /// Per layer, per logical expert, its physical slots padded with -1 to the largest replica count.
    pub log2phy: Vec<Vec<Vec<i64>>>,
    /// Per layer, replicas of each logical expert.
    pub logcnt: Vec<Vec<i64>>,
}

/// EPLB's tensors of placements (one per layer). `log2phy` lists each expert's slots in slot order and is padded
/// to the largest replica count over all layers (at least 1). Token shares are dropped.
pub fn from_placements(placements: &[Placement]) -> EplbTensors {
    EplbTensors::from_placements(placements)
}

/// One layer's `phy2log` row as a [`Placement`] of `gpus` GPUs and `experts` logical experts: slots per GPU =
/// `phy2log.len() / gpus` (which must divide), slot `i` holds expert `phy2log[i]`.
pub fn phy2log_to_placement(phy2log: &[i64], gpus: usize, experts: usize) -> Result<Placement, PlacementAlgoError> {
    if gpus == 0 || !phy2log.len().is_multiple_of(gpus) {
        return Err(PlacementAlgoError::EplbFormat(format!(
            "{} physical slots do not divide evenly over {gpus} GPUs",
            phy2log.len()
        )));
    }
    let mut slots = Vec::with_capacity(phy2log.len());
    for (slot, &x) in phy2log.iter().enumerate() {
        match u32::try_from(x) {
            Ok(e) if (e as usize) < experts => slots.push(e),
            _ => {
                return Err(PlacementAlgoError::EplbFormat(format!(
                    "phy2log[{slot}] = {x} is not a logical expert (0..{experts})"
                )));
            }
        }
    }
    Ok(Placement::new(gpus, phy2log.len() / gpus, experts, slots)?)
}

impl EplbTensors {
    /// The tensors of `placements` (one per layer); see [`from_placements`].
    pub fn from_placements(placements: &[Placement]) -> EplbTensors {
        let width = placements.iter().flat_map(|p| p.replica_counts()).max().unwrap_or(1).max(1) as usize;
        let mut out = EplbTensors { phy2log: Vec::new(), log2phy: Vec::new(), logcnt: Vec::new() };
        for p in placements {
            out.phy2log.push(p.slots.iter().map(|&x| x as i64).collect());
            let mut l2p = vec![vec![-1i64; width]; p.experts];
            for (e, slots) in p.expert_slots().iter().enumerate() {
                for (k, &s) in slots.iter().enumerate() {
                    l2p[e][k] = s as i64;
                }
            }
            out.log2phy.push(l2p);
            out.logcnt.push(p.replica_counts().iter().map(|&x| x as i64).collect());
        }
        out
    }

    /// MoE layers described.
    pub fn layers(&self) -> usize {
        self.phy2log.len()
    }

    /// Checks that the three tensors agree: as many layers in each; per layer, `logcnt` counts the slots of each
    /// expert in `phy2log`, every expert has at least one; `log2phy` has one row per expert, all rows of one width
    /// (at least the largest count), each listing exactly the expert's slots (any order) and then `-1`s.
    pub fn check(&self) -> Result<(), PlacementAlgoError> {
        let bad = |m: String| Err(PlacementAlgoError::EplbFormat(m));
        let layers = self.phy2log.len();
        if self.log2phy.len() != layers || self.logcnt.len() != layers {
            return bad(format!(
                "{} phy2log rows, {} log2phy rows and {} logcnt rows: one per layer in each",
                layers,
                self.log2phy.len(),
                self.logcnt.len()
            ));
        }
        let width = self.log2phy.iter().flatten().map(Vec::len).next();
        for l in 0..layers {
            let (p2l, l2p, cnt) = (&self.phy2log[l], &self.log2phy[l], &self.logcnt[l]);
            let experts = cnt.len();
            if l2p.len() != experts {
                return bad(format!("layer {l}: {} log2phy rows for {experts} experts", l2p.len()));
            }
            let mut count = vec![0i64; experts];
            for (slot, &x) in p2l.iter().enumerate() {
                match usize::try_from(x) {
                    Ok(e) if e < experts => count[e] += 1,
                    _ => {
                        return bad(format!("layer {l}: phy2log[{slot}] = {x} is not a logical expert (0..{experts})"));
                    }
                }
            }
            for e in 0..experts {
                if cnt[e] != count[e] {
                    return bad(format!("layer {l}: logcnt[{e}] = {} but phy2log holds it {} times", cnt[e], count[e]));
                }
                if count[e] == 0 {
                    return bad(format!("layer {l}: expert {e} has no physical slot"));
                }
                let row = &l2p[e];
                if Some(row.len()) != width || row.len() < count[e] as usize {
                    return bad(format!(
                        "layer {l}: log2phy[{e}] has {} entries; every row needs the same width, at least the largest \
                         replica count",
                        row.len()
                    ));
                }
                let (listed, pad) = row.split_at(count[e] as usize);
                if let Some(&x) = pad.iter().find(|&&x| x != -1) {
                    return bad(format!(
                        "layer {l}: log2phy[{e}] has {x} after its {} replicas, expected -1",
                        count[e]
                    ));
                }
                let mut seen: Vec<i64> = Vec::with_capacity(listed.len());
                for &s in listed {
                    let holds = usize::try_from(s).ok().and_then(|s| p2l.get(s)) == Some(&(e as i64));
                    if !holds || seen.contains(&s) {
                        return bad(format!("layer {l}: log2phy[{e}] lists slot {s}, which does not hold expert {e}"));
                    }
                    seen.push(s);
                }
            }
        }
        Ok(())
    }

    /// Layer `layer` as a [`Placement`] over `gpus` GPUs (slots per GPU = slots / `gpus`). Checks all tensors.
    pub fn placement(&self, layer: usize, gpus: usize) -> Result<Placement, PlacementAlgoError> {
        self.check()?;
        let Some(p2l) = self.phy2log.get(layer) else {
            return Err(PlacementAlgoError::EplbFormat(format!("no layer {layer} (there are {})", self.layers())));
        };
        phy2log_to_placement(p2l, gpus, self.logcnt[layer].len())
    }

    /// Every layer as a [`Placement`] over `gpus` GPUs. Checks all tensors first.
    pub fn to_placements(&self, gpus: usize) -> Result<Vec<Placement>, PlacementAlgoError> {
        self.check()?;
        (0..self.layers()).map(|l| phy2log_to_placement(&self.phy2log[l], gpus, self.logcnt[l].len())).collect()
    }

    /// Parses the JSON form (`{"phy2log": .., "log2phy": .., "logcnt": ..}`) and checks it.
    pub fn from_json(json: &str) -> Result<EplbTensors, PlacementAlgoError> {
        let t: EplbTensors = serde_json::from_str(json).map_err(|e| PlacementAlgoError::EplbFormat(e.to_string()))?;
        t.check()?;
        Ok(t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::placement::balanced_placement;
    use proptest::prelude::*;

    #[test]
    fn by_hand() {
        // GPU0: e0, e1; GPU1: e0, e2.
        let p = Placement::new(2, 2, 3, vec![0, 1, 0, 2]).unwrap();
        let t = from_placements(std::slice::from_ref(&p));
        assert_eq!(t.phy2log, vec![vec![0, 1, 0, 2]]);
        assert_eq!(t.log2phy, vec![vec![vec![0, 2], vec![1, -1], vec![3, -1]]]);
        assert_eq!(t.logcnt, vec![vec![2, 1, 1]]);
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"phy2log":[[0,1,0,2]],"log2phy":[[[0,2],[1,-1],[3,-1]]],"logcnt":[[2,1,1]]}"#);
        assert_eq!(EplbTensors::from_json(&json).unwrap().to_placements(2).unwrap(), vec![p.clone()]);
        // log2phy may list an expert's slots in any order (EPLB orders them by replica rank).
        let mut swapped = t.clone();
        swapped.log2phy[0][0] = vec![2, 0];
        assert_eq!(swapped.placement(0, 2).unwrap(), p);
        // Shares are dropped: EPLB splits evenly.
        let shared = p.clone().with_shares(&[3.0, 1.0, 1.0, 1.0]).unwrap();
        assert_eq!(from_placements(&[shared]), t);
    }

    #[test]
    fn inconsistent_tensors_are_refused() {
        let t = from_placements(&[Placement::new(2, 2, 3, vec![0, 1, 0, 2]).unwrap()]);
        let mut cases = Vec::new();
        let mut x = t.clone();
        x.logcnt[0][0] = 1;
        cases.push(x);
        let mut x = t.clone();
        x.phy2log[0][1] = 7;
        cases.push(x);
        let mut x = t.clone();
        x.phy2log[0][1] = -1;
        cases.push(x);
        let mut x = t.clone();
        x.log2phy[0][1] = vec![1, 3];
        cases.push(x);
        let mut x = t.clone();
        x.log2phy[0][0] = vec![0, 0];
        cases.push(x);
        let mut x = t.clone();
        x.log2phy[0][2] = vec![3];
        cases.push(x);
        let mut x = t.clone();
        x.logcnt.push(vec![1]);
        cases.push(x);
        // Expert 1 unplaced.
        let mut x = t.clone();
        x.phy2log[0] = vec![0, 2, 0, 2];
        x.logcnt[0] = vec![2, 0, 2];
        x.log2phy[0] = vec![vec![0, 2], vec![-1, -1], vec![1, 3]];
        cases.push(x);
        for (i, c) in cases.iter().enumerate() {
            assert!(matches!(c.check(), Err(PlacementAlgoError::EplbFormat(_))), "case {i}");
            assert!(c.to_placements(2).is_err(), "case {i}");
        }
        assert!(t.to_placements(3).is_err());
        assert!(t.placement(1, 2).is_err());
        assert!(EplbTensors::from_json("{\"phy2log\": [[0]]}").is_err());
        assert!(phy2log_to_placement(&[0, 1, 2], 2, 3).is_err());
        assert!(phy2log_to_placement(&[0, 1], 0, 2).is_err());
    }

    fn layers() -> impl Strategy<Value = Vec<Placement>> {
        (1usize..9, 1usize..5, 0usize..3, 1usize..4).prop_flat_map(|(gpus, per, extra, layers)| {
            let experts = gpus * per;
            let slots = per + extra;
            proptest::collection::vec(proptest::collection::vec(0.0f64..1000.0, experts), layers).prop_map(
                move |loads| loads.iter().map(|l| balanced_placement(l, gpus, slots).unwrap()).collect::<Vec<_>>(),
            )
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(32))]
        #[test]
        fn round_trips(ps in layers()) {
            let gpus = ps[0].gpus;
            // Placement JSON.
            for p in &ps {
                let json = serde_json::to_string(p).unwrap();
                prop_assert_eq!(&serde_json::from_str::<Placement>(&json).unwrap(), p);
            }
            // Placement -> EPLB -> Placement is the identity.
            let t = from_placements(&ps);
            t.check().unwrap();
            prop_assert_eq!(&t.to_placements(gpus).unwrap(), &ps);
            // EPLB JSON, and EPLB -> Placement -> EPLB.
            let json = serde_json::to_string(&t).unwrap();
            let back = EplbTensors::from_json(&json).unwrap();
            prop_assert_eq!(&back, &t);
            prop_assert_eq!(from_placements(&back.to_placements(gpus).unwrap()), t.clone());
            // The tensors agree with the placement's views.
            for (l, p) in ps.iter().enumerate() {
                let cnt: Vec<i64> = p.replica_counts().iter().map(|&c| c as i64).collect();
                prop_assert_eq!(&t.logcnt[l], &cnt);
                prop_assert_eq!(t.logcnt[l].iter().sum::<i64>() as usize, p.slots.len());
            }
        }
    }
}

//! Liveness-based activation memory planner.
//!
//! Every non-constant value a node produces gets a buffer in one arena. A
//! buffer lives from the node that defines it to the last node that reads it
//! (graph outputs to the end of the graph), and buffers whose lifetimes are
//! disjoint may share memory. Offsets are assigned greedily, largest buffer
//! first, each at the lowest offset free of every buffer it is live with: the
//! strategy of TFLite's arena planners, which lands close to the lower bound
//! (the peak of simultaneously live bytes) on CNN and transformer graphs.

use std::collections::HashMap;

use crate::DType;
use crate::graph::{Graph, GraphError, Precision, ValueId, eval_shape, shape_string};

/// Where one activation lives in the arena and when.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BufferSlot {
    pub value: ValueId,
    /// Byte offset in the arena (a multiple of the plan's alignment).
    pub offset: usize,
    /// Bytes the value occupies (not rounded up to the alignment).
    pub size: usize,
    /// Index of the node that produces the value.
    pub first: usize,
    /// Index of the last node reading it; `graph.nodes.len()` for a graph output.
    pub last: usize,
}

impl BufferSlot {
    fn live_with(&self, other: &BufferSlot) -> bool {
        self.first <= other.last && other.first <= self.last
    }

    fn end(&self) -> usize {
        self.offset.saturating_add(self.size)
    }

    fn overlaps_memory(&self, other: &BufferSlot) -> bool {
        self.offset < other.end() && other.offset < self.end()
    }
}

/// The arena layout of every activation of a graph at one set of symbol values.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MemoryPlan {
    /// In node order (producer index, then output position).
    pub buffers: Vec<BufferSlot>,
    /// Size of the one arena holding every buffer.
    pub arena_bytes: usize,
    /// What giving every buffer its own allocation would take (sum of sizes).
    pub naive_bytes: usize,
    /// Every offset is a multiple of this.
    pub alignment: usize,
}

impl MemoryPlan {
    /// The slot of one value, if it is in the arena.
    pub fn slot(&self, value: ValueId) -> Option<&BufferSlot> {
        self.buffers.iter().find(|b| b.value == value)
    }

    /// Most bytes live at any one node: a lower bound for any arena layout.
    pub fn live_peak_bytes(&self) -> usize {
        // (time, 0 = free / 1 = allocate, bytes): frees at a step come first.
        let mut events: Vec<(usize, u8, usize)> = Vec::with_capacity(2 * self.buffers.len());
        for b in &self.buffers {
            events.push((b.first, 1, b.size));
            events.push((b.last.saturating_add(1), 0, b.size));
        }
        events.sort_unstable();
        let (mut live, mut peak) = (0i128, 0i128);
        for (_, alloc, size) in events {
            live += if alloc == 1 { size as i128 } else { -(size as i128) };
            peak = peak.max(live);
        }
        usize::try_from(peak).unwrap_or(usize::MAX)
    }

    /// Checks that buffers live at the same time never share a byte, that every
    /// buffer is aligned and inside the arena.
    pub fn validate(&self) -> Result<(), GraphError> {
        let err = |m: String| Err(GraphError::Invalid(format!("memory plan: {m}")));
        for b in &self.buffers {
            if b.first > b.last {
                return err(format!(
                    "value {} dies (node {}) before it is defined (node {})",
                    b.value, b.last, b.first
                ));
            }
            if self.alignment == 0 || b.offset % self.alignment != 0 {
                return err(format!("value {} at offset {} is not {}-byte aligned", b.value, b.offset, self.alignment));
            }
            if b.offset.checked_add(b.size).is_none_or(|end| end > self.arena_bytes) {
                return err(format!(
                    "value {} ({} bytes at {}) ends past the {}-byte arena",
                    b.value, b.size, b.offset, self.arena_bytes
                ));
            }
        }
        // Sweep in order of definition: only buffers still live can clash.
        let mut order: Vec<&BufferSlot> = self.buffers.iter().collect();
        order.sort_by_key(|b| (b.first, b.last));
        let mut active: Vec<&BufferSlot> = Vec::new();
        for b in order {
            active.retain(|a| a.last >= b.first);
            if let Some(a) = active.iter().find(|a| a.live_with(b) && a.overlaps_memory(b)) {
                return err(format!(
                    "values {} [{}, {}) and {} [{}, {}) are live together but share memory",
                    a.value,
                    a.offset,
                    a.end(),
                    b.value,
                    b.offset,
                    b.end()
                ));
            }
            active.push(b);
        }
        Ok(())
    }
}

/// Plans the activation arena of `graph` with symbols bound to `bindings`
/// (e.g. `batch` = 64, `seq` = 128), every offset a multiple of `alignment`.
pub fn plan_memory(
    graph: &Graph,
    bindings: &HashMap<String, usize>,
    alignment: usize,
) -> Result<MemoryPlan, GraphError> {
    if alignment == 0 {
        return Err(GraphError::Invalid("memory plan: alignment must be at least 1".into()));
    }
    let mut buffers = lifetimes(graph)?;
    for b in &mut buffers {
        b.size = value_bytes(graph, b.value, b.first, bindings)?;
    }
    let naive_bytes = buffers
        .iter()
        .try_fold(0usize, |acc, b| acc.checked_add(b.size))
        .ok_or_else(|| GraphError::Invalid("memory plan: total activation size overflows".into()))?;

    let arena_bytes = place(&mut buffers, alignment)?;
    Ok(MemoryPlan { buffers, arena_bytes, naive_bytes, alignment })
}

/// Assigns offsets to `buffers` (sizes and lifetimes set; `value` is only an
/// id for tie-breaking) and returns the arena size. Device executors that
/// lower a graph to their own steps (aliases, casts, staging) reuse this.
pub fn place(buffers: &mut [BufferSlot], alignment: usize) -> Result<usize, GraphError> {
    if alignment == 0 {
        return Err(GraphError::Invalid("memory plan: alignment must be at least 1".into()));
    }
    // Largest first; ties by definition order so plans are deterministic.
    let mut order: Vec<usize> = (0..buffers.len()).collect();
    order.sort_by_key(|&i| (std::cmp::Reverse(buffers[i].size), buffers[i].first, buffers[i].value));
    let mut placed: Vec<usize> = Vec::with_capacity(buffers.len());
    let mut arena_bytes = 0usize;
    for i in order {
        let offset = lowest_free_offset(buffers, &placed, i, alignment)?;
        buffers[i].offset = offset;
        let end = offset
            .checked_add(buffers[i].size)
            .ok_or_else(|| GraphError::Invalid("memory plan: arena size overflows".into()))?;
        arena_bytes = arena_bytes.max(end);
        placed.push(i);
    }
    Ok(arena_bytes)
}

/// One slot per non-constant node output, with its definition and last use.
fn lifetimes(graph: &Graph) -> Result<Vec<BufferSlot>, GraphError> {
    let end = graph.nodes.len();
    let mut index: HashMap<ValueId, usize> = HashMap::new();
    let mut buffers: Vec<BufferSlot> = Vec::new();
    for (i, node) in graph.nodes.iter().enumerate() {
        for &v in &node.outputs {
            let value = graph.values.get(v).ok_or_else(|| {
                GraphError::Invalid(format!("memory plan: node {} writes value {v}, which does not exist", node.name))
            })?;
            if value.constant.is_some() || index.contains_key(&v) || graph.inputs.contains(&v) {
                continue;
            }
            index.insert(v, buffers.len());
            buffers.push(BufferSlot { value: v, offset: 0, size: 0, first: i, last: i });
        }
    }
    for (i, node) in graph.nodes.iter().enumerate() {
        for v in node.inputs.iter().flatten() {
            if let Some(&b) = index.get(v) {
                if buffers[b].first > i {
                    return Err(GraphError::Invalid(format!(
                        "memory plan: node {} reads {} before it is computed (graph not in topological order)",
                        node.name, graph.values[*v].name
                    )));
                }
                buffers[b].last = buffers[b].last.max(i);
            }
        }
    }
    for v in &graph.outputs {
        if let Some(&b) = index.get(v) {
            buffers[b].last = end;
        }
    }
    Ok(buffers)
}

/// Bytes of one activation at the given symbol values. An FP32 value written by
/// an FP16 node is stored as half precision.
fn value_bytes(
    graph: &Graph,
    id: ValueId,
    producer: usize,
    bindings: &HashMap<String, usize>,
) -> Result<usize, GraphError> {
    let value = &graph.values[id];
    let err = |m: String| GraphError::Invalid(format!("memory plan: value {}: {m}", value.name));
    let ty = value.ty.as_ref().ok_or_else(|| err("type unknown".into()))?;
    let shape = ty.shape.as_ref().ok_or_else(|| err("shape unknown".into()))?;
    let dims = eval_shape(shape, bindings).ok_or_else(|| {
        let unbound: Vec<&str> = shape
            .iter()
            .flat_map(|d| d.symbols())
            .filter(|s| !bindings.contains_key(s.as_str()))
            .map(String::as_str)
            .collect();
        if unbound.is_empty() {
            err(format!("shape {} does not evaluate to a size", shape_string(shape)))
        } else {
            err(format!("shape {} needs a value for {}", shape_string(shape), unbound.join(", ")))
        }
    })?;
    let elem = match (ty.dtype, graph.nodes[producer].precision) {
        (DType::F32, Precision::F16) => 2,
        (d, _) => d.size_of().ok_or_else(|| err(format!("{d} elements have no fixed size")))?,
    };
    dims.iter()
        .try_fold(elem, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| err(format!("size of shape {:?} overflows", dims)))
}

/// Lowest aligned offset where buffer `i` overlaps no placed buffer live with it.
fn lowest_free_offset(
    buffers: &[BufferSlot],
    placed: &[usize],
    i: usize,
    alignment: usize,
) -> Result<usize, GraphError> {
    let me = &buffers[i];
    let mut clashes: Vec<&BufferSlot> =
        placed.iter().map(|&p| &buffers[p]).filter(|p| p.live_with(me) && p.size > 0).collect();
    clashes.sort_by_key(|p| p.offset);
    let overflow = || GraphError::Invalid("memory plan: arena size overflows".into());
    let mut candidate = 0usize;
    for p in clashes {
        let end = candidate.checked_add(me.size).ok_or_else(overflow)?;
        if end <= p.offset {
            break;
        }
        candidate = candidate.max(align_up(p.end(), alignment).ok_or_else(overflow)?);
    }
    Ok(candidate)
}

fn align_up(n: usize, alignment: usize) -> Option<usize> {
    n.checked_next_multiple_of(alignment)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{Dim, Node, Shape, ValueType, fixed_shape};
    use crate::{Tensor, TensorData};

    fn none() -> HashMap<String, usize> {
        HashMap::new()
    }

    /// Adds a node `op(inputs) -> out` whose output holds `elems` FP32 values.
    fn node(g: &mut Graph, inputs: &[ValueId], elems: usize) -> ValueId {
        let out = g.add_value(format!("v{}", g.values.len()), Some(ValueType::new(DType::F32, fixed_shape(&[elems]))));
        let n = g.nodes.len();
        g.nodes.push(Node::new(format!("n{n}"), "Op", inputs.iter().map(|&v| Some(v)).collect(), vec![out]));
        out
    }

    fn input(g: &mut Graph, elems: usize) -> ValueId {
        let x = g.add_value("x", Some(ValueType::new(DType::F32, fixed_shape(&[elems]))));
        g.inputs.push(x);
        x
    }

    /// x -> a -> b -> ... with the given sizes (in f32 elements); the last is the output.
    fn chain(sizes: &[usize]) -> Graph {
        let mut g = Graph::new("chain", 17);
        let mut prev = input(&mut g, 1000);
        for &s in sizes {
            prev = node(&mut g, &[prev], s);
        }
        g.outputs.push(prev);
        g
    }

    #[test]
    fn chain_arena_is_two_largest_neighbours() -> Result<(), GraphError> {
        for sizes in [vec![10, 20, 30, 40], vec![40, 30, 20, 10], vec![5, 50, 5, 50, 5], vec![8, 100, 1, 1, 100, 8]] {
            let g = chain(&sizes);
            let plan = plan_memory(&g, &none(), 4)?;
            plan.validate()?;
            let pair = sizes.windows(2).map(|w| 4 * (w[0] + w[1])).max().unwrap_or(0);
            assert_eq!(plan.arena_bytes, pair, "sizes {sizes:?}");
            assert_eq!(plan.naive_bytes, 4 * sizes.iter().sum::<usize>());
            assert_eq!(plan.live_peak_bytes(), pair);
            assert_eq!(plan.buffers.len(), sizes.len());
        }
        Ok(())
    }

    #[test]
    fn chain_lifetimes_and_output_lives_to_the_end() -> Result<(), GraphError> {
        let g = chain(&[10, 10, 10]);
        let plan = plan_memory(&g, &none(), 1)?;
        let spans: Vec<(usize, usize)> = plan.buffers.iter().map(|b| (b.first, b.last)).collect();
        assert_eq!(spans, vec![(0, 1), (1, 2), (2, 3)]);
        // Buffers two steps apart reuse the same memory.
        assert_eq!(plan.buffers[0].offset, plan.buffers[2].offset);
        assert_ne!(plan.buffers[0].offset, plan.buffers[1].offset);
        assert!(plan.slot(g.inputs[0]).is_none(), "graph inputs are not in the arena");
        Ok(())
    }

    #[test]
    fn diamond_keeps_both_branches_live() -> Result<(), GraphError> {
        let mut g = Graph::new("diamond", 17);
        let x = input(&mut g, 100);
        let a = node(&mut g, &[x], 100);
        let b = node(&mut g, &[a], 50);
        let c = node(&mut g, &[a], 70);
        let d = node(&mut g, &[b, c], 100);
        g.outputs.push(d);
        let plan = plan_memory(&g, &none(), 1)?;
        plan.validate()?;
        let slot = |v| plan.slot(v).map(|s| (s.first, s.last));
        assert_eq!(slot(a), Some((0, 2)));
        assert_eq!(slot(b), Some((1, 3)));
        assert_eq!(slot(c), Some((2, 3)));
        assert_eq!(slot(d), Some((3, 4)));
        // a, b, c are live together at node 2; b, c, d at node 3.
        assert_eq!(plan.live_peak_bytes(), 4 * (100 + 50 + 70));
        assert_eq!(plan.arena_bytes, 4 * (100 + 50 + 70));
        assert_eq!(plan.naive_bytes, 4 * 320);
        Ok(())
    }

    #[test]
    fn residual_blocks_reach_the_lower_bound() -> Result<(), GraphError> {
        // Equal sizes are placed in definition order: first-fit interval
        // colouring, which is optimal, so the arena is the live peak (3 blocks).
        let mut g = Graph::new("resnet-ish", 17);
        let x = input(&mut g, 256);
        let mut h = node(&mut g, &[x], 256);
        for _ in 0..8 {
            let t = node(&mut g, &[h], 256);
            let u = node(&mut g, &[t], 256);
            h = node(&mut g, &[u, h], 256);
        }
        g.outputs.push(h);
        let plan = plan_memory(&g, &none(), 64)?;
        plan.validate()?;
        assert_eq!(plan.live_peak_bytes(), 3 * 1024);
        assert_eq!(plan.arena_bytes, 3 * 1024);
        assert_eq!(plan.naive_bytes, 25 * 1024);
        Ok(())
    }

    #[test]
    fn symbols_bind_and_unbound_symbols_are_reported() -> Result<(), GraphError> {
        let mut g = Graph::new("sym", 17);
        let shape: Shape = vec![Dim::sym("batch"), Dim::sym("seq"), Dim::fixed(384)];
        let x = g.add_value("x", Some(ValueType::new(DType::F32, shape.clone())));
        g.inputs.push(x);
        let y = g.add_value("y", Some(ValueType::new(DType::F32, shape)));
        g.nodes.push(Node::new("relu", "Relu", vec![Some(x)], vec![y]));
        g.outputs.push(y);
        let bindings: HashMap<String, usize> = [("batch".to_string(), 64), ("seq".to_string(), 128)].into();
        let plan = plan_memory(&g, &bindings, 256)?;
        assert_eq!(plan.arena_bytes, 64 * 128 * 384 * 4);
        let partial: HashMap<String, usize> = [("batch".to_string(), 64)].into();
        let e = err_text(plan_memory(&g, &partial, 256));
        assert!(e.contains("needs a value for seq"), "{e}");
        Ok(())
    }

    #[test]
    fn fp16_nodes_halve_float_activations_only() -> Result<(), GraphError> {
        let mut g = chain(&[100, 100]);
        let idx = g.add_value("shape", Some(ValueType::new(DType::I64, fixed_shape(&[100]))));
        g.nodes.push(Node::new("shape", "Shape", vec![g.inputs.first().copied()], vec![idx]));
        g.outputs.push(idx);
        let full = plan_memory(&g, &none(), 1)?;
        for n in &mut g.nodes {
            n.precision = Precision::F16;
        }
        let half = plan_memory(&g, &none(), 1)?;
        assert_eq!(full.naive_bytes, 400 + 400 + 800);
        assert_eq!(half.naive_bytes, 200 + 200 + 800);
        assert_eq!(half.slot(idx).map(|s| s.size), Some(800));
        half.validate()?;
        Ok(())
    }

    #[test]
    fn constants_are_not_buffers_and_alignment_is_respected() -> Result<(), GraphError> {
        let mut g = Graph::new("c", 17);
        let x = input(&mut g, 3);
        let w = g.add_constant("w", Tensor::new(vec![3], TensorData::F32(vec![1.0; 3])).map_err(inv)?);
        let a = node(&mut g, &[x, w], 3);
        let b = node(&mut g, &[a], 5);
        let c = node(&mut g, &[a, b], 7);
        g.outputs.push(c);
        let plan = plan_memory(&g, &none(), 64)?;
        plan.validate()?;
        assert!(plan.slot(w).is_none());
        assert_eq!(plan.buffers.len(), 3);
        assert!(plan.buffers.iter().all(|b| b.offset % 64 == 0));
        // a, b and c are live together at node 2: three aligned slots.
        assert_eq!(plan.arena_bytes, 128 + 12);
        assert!(plan_memory(&g, &none(), 0).is_err());
        Ok(())
    }

    #[test]
    fn unused_outputs_get_a_one_step_lifetime() -> Result<(), GraphError> {
        let mut g = chain(&[10]);
        let x = g.inputs[0];
        let dead = node(&mut g, &[x], 10);
        let plan = plan_memory(&g, &none(), 1)?;
        assert_eq!(plan.slot(dead).map(|s| (s.first, s.last)), Some((1, 1)));
        plan.validate()?;
        Ok(())
    }

    #[test]
    fn validate_catches_overlapping_live_buffers() -> Result<(), GraphError> {
        let g = chain(&[10, 20, 30]);
        let mut plan = plan_memory(&g, &none(), 1)?;
        plan.validate()?;
        plan.buffers[1].offset = plan.buffers[0].offset;
        let e = err_text(plan.validate());
        assert!(e.contains("share memory"), "{e}");
        let mut plan = plan_memory(&g, &none(), 1)?;
        plan.arena_bytes -= 1;
        assert!(plan.validate().is_err());
        let mut plan = plan_memory(&g, &none(), 4)?;
        plan.buffers[0].offset += 2;
        assert!(plan.validate().is_err());
        Ok(())
    }

    fn err_text<T>(r: Result<T, GraphError>) -> String {
        match r {
            Ok(_) => "unexpectedly Ok".into(),
            Err(e) => e.to_string(),
        }
    }

    fn inv(e: impl ToString) -> GraphError {
        GraphError::Invalid(e.to_string())
    }

    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }
    }

    /// Checks every pair directly rather than trusting `validate`'s sweep.
    fn brute_force_ok(plan: &MemoryPlan) -> bool {
        plan.buffers.iter().enumerate().all(|(i, a)| {
            plan.buffers[i + 1..].iter().all(|b| !(a.live_with(b) && a.overlaps_memory(b)))
                && a.end() <= plan.arena_bytes
        })
    }

    #[test]
    fn random_graphs_plan_valid_arenas() -> Result<(), GraphError> {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..200 {
            let mut g = Graph::new("random", 17);
            let x = input(&mut g, 16);
            let mut vals = vec![x];
            let n = 1 + rng.below(40);
            for _ in 0..n {
                let k = 1 + rng.below(3);
                let ins: Vec<ValueId> = (0..k).map(|_| vals[rng.below(vals.len())]).collect();
                let out = node(&mut g, &ins, rng.below(1000));
                if let Some(nd) = g.nodes.last_mut().filter(|_| rng.below(4) == 0) {
                    nd.precision = Precision::F16;
                }
                vals.push(out);
            }
            for _ in 0..1 + rng.below(3) {
                g.outputs.push(vals[1 + rng.below(vals.len() - 1)]);
            }
            let align = [1, 16, 64, 256][rng.below(4)];
            let plan = plan_memory(&g, &none(), align)?;
            plan.validate()?;
            assert!(brute_force_ok(&plan), "case {case}");
            assert!(plan.arena_bytes >= plan.live_peak_bytes(), "case {case}");
            assert_eq!(plan.buffers.len(), n);
            let aligned_sum: usize = plan.buffers.iter().map(|b| b.size.next_multiple_of(align)).sum();
            assert!(plan.arena_bytes <= aligned_sum, "case {case}");
        }
        Ok(())
    }

    #[test]
    fn out_of_order_graph_is_an_error() {
        let mut g = chain(&[10, 10]);
        g.nodes.swap(0, 1);
        let e = err_text(plan_memory(&g, &none(), 1));
        assert!(e.contains("topological"), "{e}");
    }
}

//! Graph passes that change the precision of an exported model, written with standard ONNX
//! ops only (the same model otherwise).
//!
//! - [`quantize_int8`]: dynamic int8 quantization of every weight matrix. A `MatMul` whose
//!   second input is a constant weight (an f32 initializer, or the `Transpose` of one, as
//!   [`super::builder::GraphBuilder::linear`] writes `nn.Linear`) and every `Conv` with a
//!   constant kernel get symmetric per-output-channel int8 weights (`scale_o = max|W_o| / 127`,
//!   zero point 0); the activation is quantized at run time per tensor:
//!   `DynamicQuantizeLinear(x) → MatMulInteger / ConvInteger → Cast → Mul(x_scale · w_scale)`
//!   (`+ bias` for Conv). ONNX Runtime fuses the MatMul form into one dynamic-quantized matmul.
//!   Transposed convolutions, attention products and everything else stay f32.
//! - [`to_fp16`]: weights stored and computed in f16, with f32 inputs and outputs (a `Cast`
//!   after each graph input and before each output). Meant for GPU execution providers; on
//!   the CPU ONNX Runtime runs f16 ops where it has kernels and casts around the others.

use super::proto::{
    attribute_type, data_type, AttributeProto, GraphProto, ModelProto, NodeProto, TensorProto,
};
use crate::error::{Error, Result};
use std::collections::{HashMap, HashSet};

/// What a pass changed.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PrecisionReport {
    pub matmuls: usize,
    pub convs: usize,
    /// Initializer bytes before and after.
    pub bytes_before: usize,
    pub bytes_after: usize,
}

fn graph_mut(m: &mut ModelProto) -> Result<&mut GraphProto> {
    m.graph
        .as_mut()
        .ok_or_else(|| Error::Onnx("model has no graph".into()))
}

fn f32s(t: &TensorProto) -> Result<Vec<f32>> {
    if t.data_type != data_type::FLOAT
        || !t.raw_data.len().is_multiple_of(4)
        || !t.external_data.is_empty()
    {
        return Err(Error::Onnx(format!(
            "initializer `{}`: expected inline f32 data",
            t.name
        )));
    }
    Ok(t.raw_data
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

fn init_f32(name: &str, dims: &[i64], v: &[f32]) -> TensorProto {
    TensorProto {
        name: name.into(),
        dims: dims.to_vec(),
        data_type: data_type::FLOAT,
        raw_data: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        ..Default::default()
    }
}

fn node(op: &str, name: String, inputs: &[&str], outputs: &[&str]) -> NodeProto {
    NodeProto {
        op_type: op.into(),
        name,
        input: inputs.iter().map(|s| s.to_string()).collect(),
        output: outputs.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

fn int_attr(name: &str, i: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        i,
        r#type: attribute_type::INT,
        ..Default::default()
    }
}

fn ints_of(n: &NodeProto, name: &str) -> Option<Vec<i64>> {
    n.attribute
        .iter()
        .find(|a| a.name == name)
        .map(|a| a.ints.clone())
}

/// The nodes around one integer op (`MatMulInteger` / `ConvInteger` with `attrs`) that replace
/// the float op `n`: quantize its input at run time, run the integer op on the int8 weight
/// `qname`, cast the int32 result back and scale it by `x_scale · w_scale` (`sname`). Returns
/// the nodes and the name of the scaled output (`<prefix>.ys`), for the caller to finish.
fn integer_op(
    n: &NodeProto,
    index: usize,
    op: &str,
    attrs: Vec<AttributeProto>,
    qname: &str,
    sname: &str,
) -> (Vec<NodeProto>, String) {
    let p = if n.name.is_empty() {
        format!("q{index}")
    } else {
        n.name.clone()
    };
    let (xq, xs, xz) = (format!("{p}.xq"), format!("{p}.xs"), format!("{p}.xz"));
    let (yi, yf, sc, ys) = (
        format!("{p}.yi"),
        format!("{p}.yf"),
        format!("{p}.sc"),
        format!("{p}.ys"),
    );
    let input = n.input.first().map(String::as_str).unwrap_or_default();
    let mut int_op = node(op, format!("{p}/{op}"), &[&xq, qname, &xz], &[&yi]);
    int_op.attribute = attrs;
    let mut cast = node("Cast", format!("{p}/Cast"), &[&yi], &[&yf]);
    cast.attribute.push(int_attr("to", data_type::FLOAT as i64));
    let nodes = vec![
        node(
            "DynamicQuantizeLinear",
            format!("{p}/DynamicQuantizeLinear"),
            &[input],
            &[&xq, &xs, &xz],
        ),
        int_op,
        cast,
        node("Mul", format!("{p}/ScaleMul"), &[&xs, sname], &[&sc]),
        node("Mul", format!("{p}/Mul"), &[&yf, &sc], &[&ys]),
    ];
    (nodes, ys)
}

/// Symmetric int8 per output channel: `w[o][i]` with `rows` channels of `cols` entries each
/// (`channel_major`), or `w[i][o]` (`!channel_major`). Returns (int8 bytes in the same layout,
/// scale per channel).
fn quantize_channels(
    w: &[f32],
    rows: usize,
    cols: usize,
    channel_major: bool,
) -> (Vec<u8>, Vec<f32>) {
    let (ch, per) = if channel_major {
        (rows, cols)
    } else {
        (cols, rows)
    };
    let at = |c: usize, k: usize| {
        if channel_major {
            c * cols + k
        } else {
            k * cols + c
        }
    };
    let mut scale = vec![1.0f32; ch];
    for (c, s) in scale.iter_mut().enumerate() {
        let m = (0..per).map(|k| w[at(c, k)].abs()).fold(0.0f32, f32::max);
        *s = if m > 0.0 { m / 127.0 } else { 1.0 };
    }
    let mut q = vec![0u8; w.len()];
    for (c, &sc) in scale.iter().enumerate() {
        for k in 0..per {
            let i = at(c, k);
            q[i] = ((w[i] / sc).round().clamp(-127.0, 127.0) as i8) as u8;
        }
    }
    (q, scale)
}

/// Dynamic int8 quantization of the model's weight matrices and convolution kernels (see the
/// module docs). Shared weights are quantized once; unused f32 originals are dropped.
pub fn quantize_int8(model: &mut ModelProto) -> Result<PrecisionReport> {
    let g = graph_mut(model)?;
    let mut rep = PrecisionReport {
        bytes_before: g.initializer.iter().map(|t| t.raw_data.len()).sum(),
        ..Default::default()
    };
    let inits: HashMap<String, usize> = g
        .initializer
        .iter()
        .enumerate()
        .map(|(i, t)| (t.name.clone(), i))
        .collect();
    let producer: HashMap<String, usize> = g
        .node
        .iter()
        .enumerate()
        .flat_map(|(i, n)| n.output.iter().map(move |o| (o.clone(), i)))
        .collect();
    let mut new_inits: Vec<TensorProto> = Vec::new();
    let mut made: HashSet<String> = HashSet::new();
    let mut dropped_nodes: HashSet<usize> = HashSet::new();
    let mut out_nodes: Vec<NodeProto> = Vec::with_capacity(g.node.len() * 2);
    let old_nodes = std::mem::take(&mut g.node);
    // The constant weight of a MatMul: (initializer, transposed-by-node index).
    let weight_of = |b: &str| -> Option<(usize, Option<usize>)> {
        if let Some(&i) = inits.get(b) {
            return Some((i, None));
        }
        let &ti = producer.get(b)?;
        let t = &old_nodes[ti];
        if t.op_type == "Transpose" && ints_of(t, "perm").as_deref() == Some(&[1, 0]) {
            let &wi = inits.get(t.input.first()?)?;
            return Some((wi, Some(ti)));
        }
        None
    };
    for (ni, n) in old_nodes.iter().enumerate() {
        match n.op_type.as_str() {
            "MatMul" if n.input.len() == 2 => {
                let Some((wi, tr)) = weight_of(&n.input[1]) else {
                    out_nodes.push(n.clone());
                    continue;
                };
                let w = &g.initializer[wi];
                if w.dims.len() != 2 || w.data_type != data_type::FLOAT {
                    out_nodes.push(n.clone());
                    continue;
                }
                let (r, c) = (w.dims[0] as usize, w.dims[1] as usize);
                // B = Wᵀ [in=c, out=r] when transposed (W is [out, in]), else W [in=r, out=c].
                let qname = format!("{}.int8{}", w.name, if tr.is_some() { "_t" } else { "" });
                let sname = format!("{qname}.scale");
                if made.insert(qname.clone()) {
                    let v = f32s(w)?;
                    let (q, s, dims) = match tr {
                        Some(_) => {
                            // Transpose to [in, out], channels = out (rows of W).
                            let mut t = vec![0f32; v.len()];
                            for o in 0..r {
                                for i in 0..c {
                                    t[i * r + o] = v[o * c + i];
                                }
                            }
                            let (q, s) = quantize_channels(&t, c, r, false);
                            (q, s, vec![c as i64, r as i64])
                        }
                        None => {
                            let (q, s) = quantize_channels(&v, r, c, false);
                            (q, s, vec![r as i64, c as i64])
                        }
                    };
                    new_inits.push(TensorProto {
                        name: qname.clone(),
                        dims,
                        data_type: data_type::INT8,
                        raw_data: q,
                        ..Default::default()
                    });
                    new_inits.push(init_f32(&sname, &[s.len() as i64], &s));
                }
                if let Some(ti) = tr {
                    dropped_nodes.insert(ti);
                }
                let (nodes, _) = integer_op(n, ni, "MatMulInteger", vec![], &qname, &sname);
                out_nodes.extend(nodes);
                // The scaled product takes the MatMul's output name.
                if let Some(last) = out_nodes.last_mut() {
                    last.output = vec![n.output[0].clone()];
                }
                rep.matmuls += 1;
            }
            "Conv" if n.input.len() >= 2 && inits.contains_key(&n.input[1]) => {
                let w = &g.initializer[inits[&n.input[1]]];
                if w.dims.len() != 4 || w.data_type != data_type::FLOAT {
                    out_nodes.push(n.clone());
                    continue;
                }
                let m = w.dims[0] as usize;
                let per = w.raw_data.len() / 4 / m.max(1);
                let qname = format!("{}.int8", w.name);
                let sname = format!("{qname}.scale");
                if made.insert(qname.clone()) {
                    let (q, s) = quantize_channels(&f32s(w)?, m, per, true);
                    new_inits.push(TensorProto {
                        name: qname.clone(),
                        dims: w.dims.clone(),
                        data_type: data_type::INT8,
                        raw_data: q,
                        ..Default::default()
                    });
                    new_inits.push(init_f32(&sname, &[1, m as i64, 1, 1], &s));
                }
                let (nodes, ys) =
                    integer_op(n, ni, "ConvInteger", n.attribute.clone(), &qname, &sname);
                out_nodes.extend(nodes);
                match n.input.get(2).filter(|b| !b.is_empty()) {
                    Some(b) => {
                        let bt = inits.get(b).map(|&i| &g.initializer[i]).ok_or_else(|| {
                            Error::Onnx(format!("Conv `{}`: bias `{b}` is not constant", n.name))
                        })?;
                        let bname = format!("{b}.nchw");
                        if made.insert(bname.clone()) {
                            new_inits.push(init_f32(&bname, &[1, m as i64, 1, 1], &f32s(bt)?));
                        }
                        out_nodes.push(node(
                            "Add",
                            format!("{}/BiasAdd", n.name),
                            &[&ys, &bname],
                            &[&n.output[0]],
                        ));
                    }
                    None => {
                        // No bias: the scaled product takes the Conv's output name.
                        if let Some(last) = out_nodes.last_mut() {
                            last.output = vec![n.output[0].clone()];
                        }
                    }
                }
                rep.convs += 1;
            }
            _ => out_nodes.push(n.clone()),
        }
    }
    // Transposes that only fed quantized MatMuls go; so do initializers nothing reads now.
    let dropped_outputs: HashSet<&String> = dropped_nodes
        .iter()
        .flat_map(|&i| old_nodes[i].output.iter())
        .collect();
    let still_read: HashSet<&String> = out_nodes.iter().flat_map(|n| n.input.iter()).collect();
    let mut final_nodes: Vec<NodeProto> = Vec::with_capacity(out_nodes.len());
    for n in &out_nodes {
        let is_dropped_transpose = n.op_type == "Transpose"
            && n.output
                .iter()
                .all(|o| dropped_outputs.contains(o) && !still_read.contains(o));
        if !is_dropped_transpose {
            final_nodes.push(n.clone());
        }
    }
    let read: HashSet<String> = final_nodes
        .iter()
        .flat_map(|n| n.input.iter().cloned())
        .chain(g.output.iter().map(|o| o.name.clone()))
        .collect();
    g.node = final_nodes;
    g.initializer.retain(|t| read.contains(&t.name));
    g.initializer
        .extend(new_inits.into_iter().filter(|t| read.contains(&t.name)));
    let names: HashSet<String> = g
        .node
        .iter()
        .flat_map(|n| n.output.iter().cloned())
        .collect();
    g.value_info.retain(|v| names.contains(&v.name));
    rep.bytes_after = g.initializer.iter().map(|t| t.raw_data.len()).sum();
    tag(model, "int8: dynamic, per-output-channel symmetric weights");
    Ok(rep)
}

/// Record the precision pass in the model's metadata (`gps_seg.weights`).
fn tag(model: &mut ModelProto, what: &str) {
    model.metadata_props.retain(|p| p.key != "gps_seg.weights");
    model
        .metadata_props
        .push(super::proto::StringStringEntryProto {
            key: "gps_seg.weights".into(),
            value: what.into(),
        });
}

/// `v` as little-endian f16, refusing (naming `what`, the index and the value) a value that
/// f16 cannot hold: |x| above 65504 (f16's largest) would become ±Inf, and NaN/Inf stay so.
fn f16_bytes(v: &[f32], what: &str) -> Result<Vec<u8>> {
    let max = half::f16::MAX.to_f32();
    if let Some((i, x)) = v
        .iter()
        .enumerate()
        .find(|(_, x)| x.is_nan() || x.abs() > max)
    {
        return Err(Error::Onnx(format!(
            "{what}: value {x} at index {i} does not fit in f16 (largest magnitude {max}); \
             export it in f32"
        )));
    }
    Ok(v.iter()
        .flat_map(|&x| half::f16::from_f32(x).to_le_bytes())
        .collect())
}

/// Store and compute in f16 with f32 graph inputs and outputs (see the module docs). Float
/// initializers become f16 except those ops read as f32 by definition (`Resize` scales/roi,
/// `LayerNormalization` keeps its own type), `Cast` to float casts to f16 inside the graph,
/// float `Constant` tensors too. A value f16 cannot hold (|x| > 65504, which would become
/// Inf) is refused naming the tensor, its index and value; the model is then unusable (the
/// pass stops part-way) and is not to be written.
pub fn to_fp16(model: &mut ModelProto) -> Result<PrecisionReport> {
    let g = graph_mut(model)?;
    let mut rep = PrecisionReport {
        bytes_before: g.initializer.iter().map(|t| t.raw_data.len()).sum(),
        ..Default::default()
    };
    // Inputs that must stay f32: Resize's roi (1) and scales (2).
    let keep: HashSet<String> = g
        .node
        .iter()
        .filter(|n| n.op_type == "Resize")
        .flat_map(|n| n.input.iter().skip(1).take(2).cloned())
        .collect();
    for t in g.initializer.iter_mut() {
        if t.data_type == data_type::FLOAT && !keep.contains(&t.name) {
            let v = f32s(t)?;
            t.raw_data = f16_bytes(&v, &format!("initializer `{}`", t.name))?;
            t.data_type = data_type::FLOAT16;
        }
    }
    for n in g.node.iter_mut() {
        for a in n.attribute.iter_mut() {
            if n.op_type == "Cast" && a.name == "to" && a.i == data_type::FLOAT as i64 {
                a.i = data_type::FLOAT16 as i64;
            }
            if n.op_type == "Constant" {
                if let Some(t) = a.t.as_mut().filter(|t| t.data_type == data_type::FLOAT) {
                    let v = f32s(t)?;
                    t.raw_data = f16_bytes(&v, &format!("Constant node `{}`", n.name))?;
                    t.data_type = data_type::FLOAT16;
                }
            }
        }
        if matches!(n.op_type.as_str(), "MatMul" | "Gemm") {
            rep.matmuls += 1;
        }
        if n.op_type == "Conv" {
            rep.convs += 1;
        }
    }
    // f32 at the edges: graph inputs are cast to f16, outputs are cast back to f32.
    let mut head = Vec::new();
    for i in g.input.iter() {
        if elem_type(i) == Some(data_type::FLOAT) {
            let inner = format!("{}.f16", i.name);
            let mut c = node("Cast", format!("{}/ToF16", i.name), &[&i.name], &[&inner]);
            c.attribute.push(int_attr("to", data_type::FLOAT16 as i64));
            head.push(c);
            for n in g.node.iter_mut() {
                for x in n.input.iter_mut() {
                    if *x == i.name {
                        x.clone_from(&inner);
                    }
                }
            }
        }
    }
    let mut tail = Vec::new();
    for o in g.output.iter() {
        if elem_type(o) == Some(data_type::FLOAT) {
            let inner = format!("{}.f16", o.name);
            for n in g.node.iter_mut() {
                for x in n.output.iter_mut() {
                    if *x == o.name {
                        x.clone_from(&inner);
                    }
                }
                for x in n.input.iter_mut() {
                    if *x == o.name {
                        x.clone_from(&inner);
                    }
                }
            }
            let mut c = node("Cast", format!("{}/ToF32", o.name), &[&inner], &[&o.name]);
            c.attribute.push(int_attr("to", data_type::FLOAT as i64));
            tail.push(c);
        }
    }
    head.append(&mut g.node);
    head.extend(tail);
    g.node = head;
    // Intermediate value infos would now carry the wrong element type.
    g.value_info.clear();
    rep.bytes_after = g.initializer.iter().map(|t| t.raw_data.len()).sum();
    tag(
        model,
        "fp16: weights and compute in f16, f32 inputs and outputs",
    );
    Ok(rep)
}

fn elem_type(v: &super::proto::ValueInfoProto) -> Option<i32> {
    v.r#type
        .as_ref()
        .and_then(|t| t.tensor_type.as_ref())
        .map(|t| t.elem_type)
}

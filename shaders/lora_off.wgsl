// The mat-vec's LoRA hooks (lora_matvec.wgsl) where the executor holds no adapters: nothing.

fn lora_begin(t: u32, lane: Lane) {}

fn lora_add(acc: ptr<function, Sums>, t: u32, lo: vec4<u32>, hi: vec4<u32>, lane: u32) {}

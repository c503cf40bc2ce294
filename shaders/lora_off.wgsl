// The mat-vec's LoRA hook (lora_matvec.wgsl) where the executor holds no adapters: nothing.

fn lora_add(acc: ptr<function, Sums>, t: u32, lo: vec4<u32>, hi: vec4<u32>, lane: u32) {}

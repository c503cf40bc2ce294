"""A GGUF file split into shards as llama.cpp's gguf-split writes them, for tests (the runtime reads
split models; writing them is llama.cpp's job, so this lives with the tests, on the `gguf` package).

    write_split(source, folder, n) -> folder/NAME-00001-of-0000n.gguf

Shard i holds its share of the tensors, in the file's order, and `split.no` = i, `split.count` = n,
`split.tensors.count`; the first holds every metadata key of the source, with its own value type.
"""

from __future__ import annotations

from pathlib import Path

import gguf

ARRAY = gguf.GGUFValueType.ARRAY
WRITTEN_BY_THE_WRITER = {"general.architecture", "general.alignment"}  # it adds them itself


def write_split(source: Path, folder: Path, n: int, name: str | None = None) -> Path:
    reader = gguf.GGUFReader(source)
    arch = reader.fields["general.architecture"].contents()
    alignment = reader.fields["general.alignment"].contents() if "general.alignment" in reader.fields else None
    tensors = list(reader.tensors)
    name = name or source.name.removesuffix(".gguf")
    paths = [folder / f"{name}-{i + 1:05d}-of-{n:05d}.gguf" for i in range(n)]
    for i, path in enumerate(paths):
        writer = gguf.GGUFWriter(str(path), arch, **({"alignment": alignment} if alignment else {}))
        if i == 0:
            for key, field in reader.fields.items():
                if key.startswith("GGUF.") or key in WRITTEN_BY_THE_WRITER:
                    continue
                sub_type = field.types[-1] if field.types[0] == ARRAY else None
                writer.add_key_value(key, field.contents(), field.types[0], sub_type)
        writer.add_uint16("split.no", i)
        writer.add_uint16("split.count", n)
        writer.add_int32("split.tensors.count", len(tensors))
        for t in tensors[i * len(tensors) // n:(i + 1) * len(tensors) // n]:
            writer.add_tensor(t.name, t.data, raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return paths[0]

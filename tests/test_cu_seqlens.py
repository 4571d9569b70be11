import torch

from kernels.cu_seqlens import cu_seqlens_list, remember_cu_seqlens


def test_host_list_is_reused_only_for_the_same_unchanged_tensor():
    cu = torch.tensor([0, 3, 7], dtype=torch.int32)
    assert cu_seqlens_list(cu) == [0, 3, 7]
    assert cu_seqlens_list(cu) is cu_seqlens_list(cu)  # cached
    cu[1] = 5  # in-place edit bumps the version: read again
    assert cu_seqlens_list(cu) == [0, 5, 7]
    other = torch.tensor([0, 5, 7], dtype=torch.int32)  # equal values, another tensor: read again
    assert cu_seqlens_list(other) == [0, 5, 7] and cu_seqlens_list(other) is not cu_seqlens_list(cu)


def test_remembered_host_copy_is_used_until_the_tensor_changes():
    device_copy = torch.tensor([0, 3, 7], dtype=torch.int32)
    remember_cu_seqlens(device_copy, torch.tensor([0, 2, 7]))  # a stand-in value proves it is not read back
    assert cu_seqlens_list(device_copy) == [0, 2, 7]
    device_copy[1] = 4
    assert cu_seqlens_list(device_copy) == [0, 4, 7]

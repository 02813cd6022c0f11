{{/* Names and labels shared by every template. */}}

{{- define "vmreplica.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "vmreplica.labels" -}}
app.kubernetes.io/name: vmreplica
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "vmreplica.controller.selector" -}}
app.kubernetes.io/name: vmreplica
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end -}}

{{/* The pods of one agent pool; call with (dict "root" $ "pool" $pool). */}}
{{- define "vmreplica.agent.selector" -}}
app.kubernetes.io/name: vmreplica
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: agent
vmreplica.io/pool: {{ .pool.name }}
{{- end -}}

{{- define "vmreplica.image" -}}
{{- printf "%s/%s:%s" .root.Values.image.registry .component (.root.Values.image.tag | default .root.Chart.AppVersion) -}}
{{- end -}}

{{- define "vmreplica.controller.tlsSecret" -}}
{{- .Values.controller.tlsSecretName | default (printf "%s-controller-tls" (include "vmreplica.fullname" .)) -}}
{{- end -}}

{{- define "vmreplica.agent.tlsSecret" -}}
{{- .pool.tlsSecretName | default (printf "%s-agent-tls" (include "vmreplica.fullname" .root)) -}}
{{- end -}}

{{- define "vmreplica.agent.serverName" -}}
{{- .Values.agents.serverName | default (printf "%s-agent.%s.svc" (include "vmreplica.fullname" .) .Release.Namespace) -}}
{{- end -}}

{{/* Environment every pod needs: where the API is, and who it is. */}}
{{- define "vmreplica.env" -}}
- name: POD_NAMESPACE
  valueFrom: {fieldRef: {fieldPath: metadata.namespace}}
- name: POD_NAME
  valueFrom: {fieldRef: {fieldPath: metadata.name}}
- name: NODE_NAME
  valueFrom: {fieldRef: {fieldPath: spec.nodeName}}
{{- with .Values.apiServer }}
{{- if .host }}
- name: KUBERNETES_SERVICE_HOST
  value: {{ .host | quote }}
- name: KUBERNETES_SERVICE_PORT
  value: {{ .port | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}
